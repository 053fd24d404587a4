#!/usr/bin/env python3
"""Reference for `aviary bench train`: the same training steps in eager PyTorch, same threads.

    ~/.cache/aviary/venv/bin/python tests/reference/bench_train.py --threads 2 \
        --aviary-json aviary.json          # aviary.json from `aviary bench train --json`

Cases: `tiny` (the config of tests/fixtures/tiny-llama), `aquila-100m` (hidden 768, 12 layers,
12 heads, 4 KV heads, intermediate 2048, vocab 32000, untied; 256 tokens x 4) and `aquila-100m-2k`
(the same model at 2048 tokens x 1, Aquila's pretraining context), all randomly initialised, built
with train_model.py. One step = forward + cross-entropy + backward over one micro-batch of random
tokens [micro_batch, seq_len], clip_grad_norm_(1.0), AdamW step, zero_grad. `--dtype bf16` runs
forward and loss under torch.autocast(cpu, bfloat16) with fp32 master weights and optimizer
state. AdamW is the fused CPU kernel when this torch has one, else the foreach one (the table
says which). After --warmup untimed steps, step time is the mean over --steps timed steps.

Each case runs in its own process so that its peak RSS (ru_maxrss) is its own.

With --aviary BIN it also runs `BIN bench train` for each case, alternating with the reference
--pairs times, and prints every pair's ratio and their median: on a shared VM either side's
speed drifts by 10% or more within minutes, so only back-to-back pairs compare.

    ~/.cache/aviary/venv/bin/python tests/reference/bench_train.py --threads 2 \
        --cases aquila-100m --dtype bf16 --aviary build/aviary --pairs 5
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_CONFIG = os.path.join(HERE, "..", "fixtures", "tiny-llama", "config.json")
AQUILA_100M = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
               "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
               "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# Per-case defaults: seq_len, micro_batch, timed steps.
DEFAULTS = {"tiny": (128, 8, 20), "aquila-100m": (256, 4, 4), "aquila-100m-2k": (2048, 1, 3)}


def make_optimizer(params, lr=1e-4):
    import torch
    params = list(params)  # a generator would be spent by a failed first attempt
    try:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True), "fused"
    except (RuntimeError, ValueError):  # builds without a fused CPU kernel refuse at construction
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True), "foreach"


def run_case(args):
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, HERE)
    from train_model import Llama, config_from_hf, count_params

    torch.set_num_threads(args.threads)
    if args.case == "tiny":
        with open(TINY_CONFIG, encoding="utf-8") as f:
            hf = json.load(f)
    else:
        hf = AQUILA_100M
    torch.manual_seed(1234)
    model = Llama(config_from_hf(hf)).train()
    vocab = model.config.vocab_size
    opt, kind = make_optimizer(model.parameters())
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, vocab, (args.micro_batch, args.seq_len + 1), generator=g)
               for _ in range(args.warmup + args.steps)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(batch):
        with autocast:
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for b in batches[:args.warmup]:
        step(b)
    t0 = time.perf_counter()
    for b in batches[args.warmup:]:
        step(b)
    step_time = (time.perf_counter() - t0) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"case": args.case, "dtype": args.dtype, "params": count_params(model),
            "threads": args.threads, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "tokens_per_s": args.micro_batch * args.seq_len / step_time, "step_time_s": step_time,
            "peak_rss_mb": peak, "optimizer": f"torch AdamW {kind}"}


def run_reference(args, case):
    """One case of the reference in a child process (its own peak RSS)."""
    seq_len, micro_batch, steps = DEFAULTS[case]
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--dtype", args.dtype,
           "--threads", str(args.threads), "--seq-len", str(args.seq_len or seq_len),
           "--micro-batch", str(args.micro_batch or micro_batch),
           "--steps", str(args.steps or steps), "--warmup", str(args.warmup)]
    # The same OpenMP wait policy as the aviary binary sets for itself (tools/aviary/main.cpp):
    # libgomp's default parks workers on slow futex wake-ups on small VMs, which would make
    # the reference needlessly slow at 2 threads. A value set by the caller is kept.
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "active")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_aviary(args, case):
    """The same case through `aviary bench train --json` (same shapes, steps and threads)."""
    seq_len, micro_batch, steps = DEFAULTS[case]
    cmd = [args.aviary, "bench", "train", "--cases", f"{case}:{args.dtype}", "--json",
           "--threads", str(args.threads), "--seq-len", str(args.seq_len or seq_len),
           "--micro-batch", str(args.micro_batch or micro_batch),
           "--steps", str(args.steps or steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


def span(values, fmt):
    return f"{min(values):{fmt}}–{max(values):{fmt}}" if len(values) > 1 else f"{values[0]:{fmt}}"


def compare_in_pairs(args):
    """Aviary and the reference back to back, --pairs times per case: each pair's ratio, and the
    median of them (the figure docs/benchmarks.md reports)."""
    print(f"| case | dtype | pairs | torch tok/s | aviary tok/s | x torch, each pair | median |"
          f" peak RSS x torch | GEMM ceiling x torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        ours, theirs = [], []
        for _ in range(args.pairs):
            ours.append(run_aviary(args, case))
            theirs.append(run_reference(args, case))
        speed = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, theirs)]
        rss = [o["peak_rss_mb"] / t["peak_rss_mb"] for o, t in zip(ours, theirs)]
        ceiling = [o["gemm_ceiling_tokens_per_s"] / t["tokens_per_s"]
                   for o, t in zip(ours, theirs) if o.get("gemm_ceiling_tokens_per_s")]
        print(f"| {case} | {args.dtype} | {args.pairs} |"
              f" {span([t['tokens_per_s'] for t in theirs], '.1f')} |"
              f" {span([o['tokens_per_s'] for o in ours], '.1f')} |"
              f" {' '.join(f'{x:.2f}' for x in speed)} | {statistics.median(speed):.2f} |"
              f" {span(rss, '.2f')} | {span(ceiling, '.2f') if ceiling else '-'} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, help="default: tiny 128, aquila-100m 256, aquila-100m-2k 2048")
    ap.add_argument("--micro-batch", type=int, help="default: tiny 8, aquila-100m 4, aquila-100m-2k 1")
    ap.add_argument("--steps", type=int, help="timed steps; default: tiny 20, aquila-100m 4, aquila-100m-2k 3")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    ap.add_argument("--aviary-json", help="output of `aviary bench train --json` to compare with")
    ap.add_argument("--aviary", metavar="BIN",
                    help="also run `BIN bench train` per case, alternating with the reference")
    ap.add_argument("--pairs", type=int, default=3, help="with --aviary: alternating pairs per case")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    if args.aviary:
        compare_in_pairs(args)
        return
    rows = [run_reference(args, case) for case in args.cases]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    ours = {}
    if args.aviary_json:
        names = {"float32": "fp32", "bfloat16": "bf16"}
        with open(args.aviary_json) as f:
            ours = {(r["case"], names.get(r["dtype"], r["dtype"])): r for r in json.load(f)}
    # The GEMM ceiling (aviary's JSON): tokens/s of the step's GEMMs alone on this machine.
    print("| case | dtype | params | threads | seq x batch | optimizer | torch tok/s | torch step s |"
          " torch peak MB | aviary tok/s | x torch | aviary peak MB | x torch |"
          " GEMM ceiling tok/s | ceiling x torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = ours.get((r["case"], r["dtype"]))
        ceiling = o.get("gemm_ceiling_tokens_per_s") if o else None
        extra = (f"{o['tokens_per_s']:.1f} | {o['tokens_per_s'] / r['tokens_per_s']:.2f} | "
                 f"{o['peak_rss_mb']:.0f} | {o['peak_rss_mb'] / r['peak_rss_mb']:.2f}"
                 if o else "- | - | - | -")
        extra += (f" | {ceiling:.1f} | {ceiling / r['tokens_per_s']:.2f}" if ceiling else " | - | -")
        print(f"| {r['case']} | {r['dtype']} | {r['params'] / 1e6:.2f}M | {r['threads']} | "
              f"{r['seq_len']} x {r['micro_batch']} | {r['optimizer']} | {r['tokens_per_s']:.1f} | "
              f"{r['step_time_s']:.3f} | {r['peak_rss_mb']:.0f} | {extra} |")

if __name__ == "__main__":
    main()
