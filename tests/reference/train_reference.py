#!/usr/bin/env python3
"""Generates the trainer parity fixture: 20 AdamW steps of the tiny model in eager PyTorch.

    ~/.cache/aviary/venv/bin/python tests/reference/train_reference.py \
        --aviary build/aviary --out tests/fixtures/train-parity

Outputs under --out:
  corpus.jsonl         the training text: the first lines of data/corpus/en.jsonl and zh.jsonl,
                       alternating, up to --corpus-bytes (enough tokens for the run, small to
                       commit).
  data.{bin,idx,json}  made by `aviary data prepare` with the tiny-llama tokenizer, so data.json
                       carries Aviary's own tokenizer fingerprint.
  train.yaml           the Aviary config of the same run (paths relative to the repository root;
                       the C++ test overrides checkpoint.dir and log.dir with --set).
  expected.json        settings, and per step: loss, pre-clip grad norm, learning rate.
  final.safetensors    the weights after the last step, fp32, HF names.

The run reproduces the trainer's semantics: with val_fraction 0 and shuffle false, sample i is
stream[i*L : i*L + L + 1] of all tokens concatenated (inputs = first L, targets = last L,
positions 0..L-1, no document mask); step s takes samples [s*G, (s+1)*G) in micro-batches of M
rows, each contributing (mean CE over its tokens) / (G/M) to the gradient and the reported loss;
clip_grad_norm_ over all parameters; AdamW (fused=True, the kernel the trainer's default
optim.fused calls) with a decay group (names
without "norm"/"bias", embeddings and lm_head included) then a no-decay group, HF order within
each. Before training, the model of train_model.py is checked against transformers.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_model import load_pretrained  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
IDX_MAGIC = b"AVYIDX1\0"

TRAIN_YAML = """\
model:
  arch: aquila
  init_from: {init_from}
data:
  datasets: [{dataset}]
  seq_len: {seq_len}
  val_fraction: 0
  shuffle: false
train:
  steps: {steps}
  global_batch: {global_batch}
  micro_batch: {micro_batch}
  precision: fp32
  threads: {threads}
  eval_every: 0
  lr_schedule: {{type: cosine, warmup_steps: {warmup_steps}, warmup_init_lr: {warmup_init_lr}, min_lr: {min_lr}}}
optim: {{lr: {lr}, betas: [{beta1}, {beta2}], eps: {eps}, weight_decay: {weight_decay}, grad_clip: {grad_clip}, fused: true}}
checkpoint: {{dir: runs/train-parity, every: 0, keep_last: 1}}
log: {{every: 1, tensorboard: false, progress: plain}}
"""


def yaml_number(x):
    """Small floats as 1.0e-8, not Python's 1e-08, which YAML 1.1 readers take for a string."""
    if x == 0 or abs(x) >= 0.1:
        return repr(x)
    mantissa, exponent = f"{x:.15e}".split("e")
    mantissa = mantissa.rstrip("0")
    return f"{mantissa}0e{int(exponent)}" if mantissa.endswith(".") else f"{mantissa}e{int(exponent)}"


def write_corpus(path, max_bytes):
    """Whole lines of en.jsonl and zh.jsonl, alternating from the first, up to max_bytes.

    Alternating keeps both languages in every part of the stream, so the loss curve is one of
    learning rather than a jump where the English text ends.
    """
    files = [open(os.path.join(ROOT, "data", "corpus", f"{lang}.jsonl"), encoding="utf-8")
             for lang in ("en", "zh")]
    used = 0
    with open(path, "w", encoding="utf-8") as out:
        for pair in zip(*files):
            size = sum(len(line.encode("utf-8")) for line in pair)
            if used + size > max_bytes:
                break
            for line in pair:
                json.loads(line)["text"]  # fail here, not in the CLI, on a malformed line
                out.write(line)
            used += size
    for f in files:
        f.close()


def read_tokens(prefix):
    """All tokens of an Aviary token dataset (.idx header checked), as one int64 stream."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(24)
        assert header[:8] == IDX_MAGIC, header[:8]
        version, token_size = np.frombuffer(header[8:16], "<u4")
        docs = int(np.frombuffer(header[16:24], "<u8")[0])
        assert (version, token_size) == (1, 4), (version, token_size)
        offsets = np.frombuffer(f.read(8 * (docs + 1)), "<u8")
    tokens = np.fromfile(prefix + ".bin", dtype="<u4")
    assert offsets[0] == 0 and offsets[-1] == len(tokens), (offsets[-1], len(tokens))
    return torch.from_numpy(tokens.astype(np.int64))


def lr_at(step, s):
    """The C++ LrSchedule formula, written as its weighted sums so the doubles agree bit for bit."""
    peak, w = s["lr"], s["warmup_steps"]
    if step < w:
        f = (step + 1) / w
        return s["warmup_init_lr"] * (1.0 - f) + peak * f
    p = min(1.0, max(0.0, (step - w) / (s["steps"] - w)))
    c = 0.5 * (1.0 + math.cos(math.pi * p))
    return peak * c + s["min_lr"] * (1.0 - c)


def check_against_hf(model, model_dir, ids):
    """train_model.py must be the same function as transformers' LlamaForCausalLM."""
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = [n for n, _ in model.named_parameters()]
    theirs = [n for n, _ in hf.named_parameters()]
    assert ours == theirs, "parameter order differs from HF's"
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-5, f"logits differ from transformers by {diff}"
    return diff


def train(model, stream, s):
    L, G, M = s["seq_len"], s["global_batch"], s["micro_batch"]
    accum = G // M
    needed = s["steps"] * G
    available = (len(stream) - 1) // L
    assert available >= needed, f"{available} samples, the run needs {needed}"
    samples = torch.stack([stream[i * L:i * L + L + 1] for i in range(needed)])

    named = list(model.named_parameters())
    no_decay = [p for n, p in named if "norm" in n or "bias" in n]
    decay = [p for n, p in named if not ("norm" in n or "bias" in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s["lr"], betas=(s["beta1"], s["beta2"]), eps=s["eps"], fused=True)
    params = [p for _, p in named]

    losses, grad_norms, lrs = [], [], []
    vocab = model.config.vocab_size
    for step in range(s["steps"]):
        batch = samples[step * G:(step + 1) * G]
        loss_sum = 0.0
        for m in range(accum):
            rows = batch[m * M:(m + 1) * M]
            logits = model(rows[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab).float(), rows[:, 1:].reshape(-1)) / accum
            loss.backward()
            loss_sum += loss.item()  # as the C++: item() of the divided loss, summed as doubles
        norm = torch.nn.utils.clip_grad_norm_(params, s["grad_clip"]).item()
        assert math.isfinite(loss_sum) and math.isfinite(norm), (step, loss_sum, norm)
        lr = lr_at(step, s)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum)
        grad_norms.append(norm)
        lrs.append(lr)
        print(f"step {step:2d}  loss {loss_sum:.6f}  grad_norm {norm:.6f}  lr {lr:.6g}")
    return losses, grad_norms, lrs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aviary", required=True, help="the aviary CLI, for `data prepare`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "tiny-llama"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus-bytes", type=int, default=14000, help="size of corpus.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)

    def rel(path):  # configs name paths relative to the repository root
        return os.path.relpath(os.path.abspath(path), ROOT)

    settings = {
        "init_from": rel(args.model), "dataset": rel(os.path.join(args.out, "data")),
        "precision": "fp32", "threads": args.threads,
        "seq_len": 32, "steps": 20, "global_batch": 8, "micro_batch": 4,
        "lr_schedule": "cosine", "warmup_steps": 5, "warmup_init_lr": 0.0, "min_lr": 1e-3,
        "lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0,
        "adamw": "fused",
        "val_fraction": 0, "shuffle": False,
    }

    corpus = os.path.join(args.out, "corpus.jsonl")
    write_corpus(corpus, args.corpus_bytes)
    # Relative paths from the repository root, so data.json records portable source names.
    subprocess.run([os.path.abspath(args.aviary), "data", "prepare", "-i", rel(corpus),
                    "-o", settings["dataset"], "-t", settings["init_from"], "-q"],
                   check=True, cwd=ROOT)
    with open(os.path.join(args.out, "train.yaml"), "w", encoding="utf-8") as f:
        f.write(TRAIN_YAML.format(**{k: yaml_number(v) if isinstance(v, float) else v
                                     for k, v in settings.items()}))

    stream = read_tokens(os.path.join(args.out, "data"))
    model = load_pretrained(args.model)
    L, M = settings["seq_len"], settings["micro_batch"]
    first = torch.stack([stream[i * L:i * L + L] for i in range(M)])
    hf_diff = check_against_hf(model, args.model, first)
    print(f"{len(stream)} tokens; train_model vs transformers max abs logit diff {hf_diff:.3g}")

    losses, grad_norms, lrs = train(model, stream, settings)

    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
              os.path.join(args.out, "final.safetensors"))
    expected = {
        "generated_by": f"tests/reference/train_reference.py (transformers {transformers.__version__})",
        "torch_version": torch.__version__,
        "settings": settings,
        "dataset_tokens": len(stream),
        "hf_max_abs_logit_diff": hf_diff,
        "losses": losses, "grad_norms": grad_norms, "lrs": lrs,
    }
    with open(os.path.join(args.out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1)
    print(f"wrote {args.out}: loss {losses[0]:.6f} -> {losses[-1]:.6f}")


if __name__ == "__main__":
    main()
