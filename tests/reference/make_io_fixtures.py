#!/usr/bin/env python3
"""Writes the io fixtures under tests/fixtures/io/ with the reference `safetensors` and `torch`.

    ~/.cache/aviary/venv/bin/python tests/reference/make_io_fixtures.py

Outputs (all deterministic, ~60 KB in total):
  dtypes.safetensors + dtypes.json   one tensor per dtype (incl. a 0-d scalar and an empty tensor),
                                     metadata, and the expected values as JSON
  tiny/                              the same tiny "model" weights in every layout the WeightReader
                                     reads: single model.safetensors, sharded safetensors + index,
                                     single pytorch_model.bin, sharded .bin + index
  legacy.bin                         torch.save with the pre-1.6 (non-zip) format: Aviary refuses it
  ordered_state_dict.bin             torch.save(module.state_dict()) unchanged (an OrderedDict):
                                     LibTorch's unpickler cannot read it, Aviary refuses it clearly

Tiny-model values follow a formula the C++ test recomputes (all exact in bf16):
  tensor k (in TINY order) = ((arange(numel) % 17) - 8) * 0.125 * (k + 1), reshaped.
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "io")

TINY = [  # name, shape, dtype
    ("model.embed_tokens.weight", (16, 8), torch.float32),
    ("model.layers.0.self_attn.q_proj.weight", (8, 8), torch.float32),
    ("model.layers.0.self_attn.k_proj.weight", (4, 8), torch.float32),
    ("model.layers.0.mlp.gate_proj.weight", (12, 8), torch.bfloat16),
    ("model.layers.0.mlp.up_proj.weight", (12, 8), torch.bfloat16),
    ("model.layers.0.input_layernorm.weight", (8,), torch.float32),
    ("model.norm.weight", (8,), torch.float32),
    ("lm_head.weight", (16, 8), torch.float16),
]


def tiny_value(k, shape, dtype):
    n = 1
    for d in shape:
        n *= d
    v = ((torch.arange(n, dtype=torch.float64) % 17) - 8) * 0.125 * (k + 1)
    return v.reshape(shape).to(dtype)


def tiny_state():
    return {name: tiny_value(k, shape, dtype) for k, (name, shape, dtype) in enumerate(TINY)}


class TinyModule(torch.nn.Module):
    """Module whose state_dict() has exactly the TINY names."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(16, 8)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj = nn.Linear(8, 8, bias=False)
        layer.self_attn.k_proj = nn.Linear(8, 4, bias=False)
        layer.mlp = nn.Module()
        layer.mlp.gate_proj = nn.Linear(8, 12, bias=False)
        layer.mlp.up_proj = nn.Linear(8, 12, bias=False)
        layer.input_layernorm = nn.Module()
        layer.input_layernorm.weight = nn.Parameter(torch.ones(8))
        self.model.layers = nn.ModuleList([layer])
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.ones(8))
        self.lm_head = nn.Linear(8, 16, bias=False)


def write_dtypes():
    t = {
        "f64": torch.tensor([1.5, -2.25, 1e300], dtype=torch.float64),
        "f32": (torch.arange(12, dtype=torch.float32) * 0.5 - 1).reshape(3, 4),
        "f16": (torch.arange(6, dtype=torch.float32) / 4).to(torch.float16).reshape(2, 3),
        "bf16": (torch.arange(8, dtype=torch.float32) * 0.25 - 1).to(torch.bfloat16),
        "i64": torch.tensor([-2, -1, 0, 1, 2**40], dtype=torch.int64),
        "i32": torch.tensor([[-7, 7], [2**31 - 1, -(2**31)]], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 17], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
    }
    metadata = {"format": "pt", "note": "aviary io fixture"}
    save_file(t, os.path.join(ROOT, "dtypes.safetensors"), metadata=metadata)
    expected = {
        "metadata": metadata,
        "tensors": {
            k: {
                "dtype": str(v.dtype).replace("torch.", ""),
                "shape": list(v.shape),
                "values": [float(x) for x in v.double().flatten().tolist()],
            }
            for k, v in t.items()
        },
    }
    with open(os.path.join(ROOT, "dtypes.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)


def write_index(path, state, weight_file_of):
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {name: weight_file_of[name] for name in sorted(state)}}
    with open(path, "w") as f:
        json.dump(index, f, indent=2)


def write_tiny():
    state = tiny_state()
    names = [n for n, _, _ in TINY]
    halves = [names[:4], names[4:]]

    d = os.path.join(ROOT, "tiny", "single_safetensors")
    os.makedirs(d)
    save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

    d = os.path.join(ROOT, "tiny", "sharded_safetensors")
    os.makedirs(d)
    file_of = {}
    for i, part in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, os.path.join(d, fname), metadata={"format": "pt"})
        file_of.update({n: fname for n in part})
    write_index(os.path.join(d, "model.safetensors.index.json"), state, file_of)

    # The state dict of a real nn.Module, saved the way transformers' save_pretrained saves shards:
    # a plain dict. gate/up are views into one fused storage (non-zero storage offset), which a
    # naive reader gets wrong.
    fused = torch.cat([state[names[3]], state[names[4]]], dim=0)
    bin_state = dict(state)
    bin_state[names[3]] = fused[:12]
    bin_state[names[4]] = fused[12:]
    module = TinyModule()
    module.load_state_dict(bin_state, assign=True)
    sd = module.state_dict()
    assert list(sd) == names, list(sd)
    assert sd[names[3]].untyped_storage().data_ptr() == sd[names[4]].untyped_storage().data_ptr()
    d = os.path.join(ROOT, "tiny", "single_bin")
    os.makedirs(d)
    torch.save(dict(sd), os.path.join(d, "pytorch_model.bin"))
    # torch.save(model.state_dict()) as is: an OrderedDict with `_metadata`. LibTorch's unpickler
    # turns every OrderedDict into None, so Aviary reports this as unsupported (with a hint).
    torch.save(sd, os.path.join(ROOT, "ordered_state_dict.bin"))

    d = os.path.join(ROOT, "tiny", "sharded_bin")
    os.makedirs(d)
    file_of = {}
    for i, part in enumerate(halves):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n].clone() for n in part}, os.path.join(d, fname))
        file_of.update({n: fname for n in part})
    write_index(os.path.join(d, "pytorch_model.bin.index.json"), state, file_of)

    torch.save({"w": torch.ones(2)}, os.path.join(ROOT, "legacy.bin"),
               _use_new_zipfile_serialization=False)


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    torch.manual_seed(0)
    write_dtypes()
    write_tiny()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {ROOT} ({total} bytes)")


if __name__ == "__main__":
    main()
