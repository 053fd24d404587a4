#!/usr/bin/env python3
"""Generates the LoRA fixtures under tests/fixtures/lora/ with HF transformers + peft.

    ~/.cache/aviary/venv/bin/python tests/reference/make_lora_fixtures.py [--out DIR]

Base model: tests/fixtures/tiny-llama (make_llama_fixtures.py), fp32, eager attention. Adapter:
peft LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM") on all
seven linear projections of every layer (scaling = lora_alpha / r = 2). peft initialises lora_B
to zero, which would make any parity check trivial, so every lora_A and lora_B is re-drawn from
normal(0, 0.1) with a seeded generator (in the order of the adapter's state dict).

Outputs (~250 KB, deterministic for a given transformers/peft/torch version):
  adapter/                   peft save_pretrained: adapter_config.json, adapter_model.safetensors
                             (fp32; keys like base_model.model.model.layers.0.self_attn.q_proj.
                             lora_A.weight, without the adapter name). target_modules is
                             sorted and base_model_name_or_path made relative afterwards, so
                             the files are reproducible; peft's model card is not kept.
  expected.safetensors       input_ids       int64 [2, 12], seeded, in [3, 1000)
                             logits          fp32 [2, 12, 1008], base + adapter, eval mode
                             loss            fp32 [1], mean cross entropy of logits[:, :-1]
                                             against input_ids[:, 1:] (all 22 positions)
                             grad.<key>      fp32, d loss / d <key> for every <key> of
                                             adapter_model.safetensors (base weights frozen)
                             merged_logits   fp32 [2, 12, 1008], merge_and_unload() model
  expected.json              versions, the settings above, the loss, max |logits - base
                             logits| (how much the adapter matters) and max |merged_logits -
                             logits| (peft's own merge error)
"""
import argparse
import json
import os
import shutil
import sys

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
BASE = os.path.join(ROOT, "tiny-llama")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, INIT_STD = 4, 8, 0.1
SEED = 20261129


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--out", default=os.path.join(ROOT, "lora"))
    args = ap.parse_args()

    torch.manual_seed(SEED)
    base = LlamaForCausalLM.from_pretrained(args.base, dtype=torch.float32,
                                            attn_implementation="eager").eval()
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM", target_modules=TARGETS)
    model = get_peft_model(base, cfg).eval()

    # Re-initialise A and B (peft zero-inits B), in the adapter state dict's order.
    gen = torch.Generator().manual_seed(SEED)
    params = dict(model.named_parameters())
    lora_names = sorted(n for n in params if ".lora_A." in n or ".lora_B." in n)
    assert len(lora_names) == 2 * len(TARGETS) * base.config.num_hidden_layers, lora_names
    with torch.no_grad():
        for n in lora_names:
            p = params[n]
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * INIT_STD)
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    assert trainable == lora_names, trainable

    shutil.rmtree(args.out, ignore_errors=True)
    adapter_dir = os.path.join(args.out, "adapter")
    model.save_pretrained(adapter_dir)
    # Make the output reproducible: peft writes target_modules from a Python set (its order
    # changes with PYTHONHASHSEED) and base_model_name_or_path as the absolute path given here.
    # Rewritten the way peft writes it (indent 2, sorted keys, no final newline). Also drop the
    # generated model card.
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        adapter_cfg = json.load(f)
    assert sorted(adapter_cfg["target_modules"]) == sorted(TARGETS), adapter_cfg
    adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])
    adapter_cfg["base_model_name_or_path"] = "tests/fixtures/tiny-llama"
    with open(cfg_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(adapter_cfg, indent=2, sort_keys=True))
    os.remove(os.path.join(adapter_dir, "README.md"))

    # Map saved key -> live parameter. peft drops the adapter name ("default") on save.
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = get_peft_model_state_dict(model)
    assert sorted(saved) == sorted(state), (sorted(saved), sorted(state))
    key_to_param = {}
    for k in saved:
        live = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(params[live].detach(), saved[k]), k
        key_to_param[k] = params[live]
    assert len(key_to_param) == len(lora_names)

    gen_ids = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(3, 1000, (2, 12), generator=gen_ids, dtype=torch.int64)

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits.float()
    v = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    loss.backward()
    out = {
        "input_ids": ids.contiguous(),
        "logits": logits.detach().contiguous(),
        "loss": loss.detach().reshape(1).contiguous(),
    }
    for k, p in sorted(key_to_param.items()):
        assert p.grad is not None, k
        out["grad." + k] = p.grad.detach().clone().contiguous()

    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits.float()
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits.float()
    out["merged_logits"] = merged_logits.contiguous()
    save_file(out, os.path.join(args.out, "expected.safetensors"))

    adapter_effect = (logits - base_logits).abs().max().item()
    merge_err = (merged_logits - logits).abs().max().item()
    with open(os.path.join(args.out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({
            "generated_by": {"transformers": transformers.__version__, "peft": peft.__version__,
                             "torch": torch.__version__},
            "base": "tests/fixtures/tiny-llama",
            "r": RANK, "lora_alpha": ALPHA, "scaling": ALPHA / RANK, "init_std": INIT_STD,
            "target_modules": TARGETS,
            "loss": loss.item(),
            "max_abs_logits_minus_base": adapter_effect,
            "max_abs_merged_minus_logits": merge_err,
        }, f, indent=1)
    print(f"wrote {os.path.abspath(args.out)}: loss {loss.item():.6f}, "
          f"max |logits - base logits| {adapter_effect:.4g}, "
          f"max |merged logits - logits| {merge_err:.4g}")


if __name__ == "__main__":
    sys.exit(main())
