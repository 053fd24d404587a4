#!/usr/bin/env python3
"""Reference for `aviary bench decode`: the same cases with HF transformers, same threads.

    ~/.cache/aviary/venv/bin/python tests/reference/bench_decode.py --threads 2 \
        --aviary-json aviary.json          # aviary.json from `aviary bench decode --json`

Each case runs in its own process so that its peak RSS is its own. Greedy decoding of
--new-tokens after a random prompt of --prompt-tokens, best of --repeats, prefill timed
separately (one forward over the prompt), as the C++ benchmark does. HF runs with its SDPA
attention and DynamicCache, in torch.inference_mode.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def aquila_100m():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)


def run_case(args, spec):
    import torch
    from transformers import LlamaForCausalLM
    torch.set_num_threads(args.threads)
    name, dtype_name = spec.split(":")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if name == "tiny":
        model = LlamaForCausalLM.from_pretrained(args.tiny_model, dtype=dtype)
    else:
        torch.manual_seed(1234)
        model = LlamaForCausalLM(aquila_100m()).to(dtype)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (args.batch, args.prompt_tokens), generator=g)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
        best_prefill = best_decode = 0.0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(ids, use_cache=True)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            total = time.perf_counter() - t0
            new = out.shape[1] - ids.shape[1]
            # generate() = one prefill + (new - 1) decode steps.
            decode = max(total - prefill, 1e-9)
            best_prefill = max(best_prefill, args.batch * args.prompt_tokens / prefill)
            best_decode = max(best_decode, args.batch * (new - 1) / decode)
    params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"case": name, "dtype": dtype_name, "params": params, "threads": args.threads,
            "prefill_tok_s": best_prefill, "decode_tok_s": best_decode, "peak_rss_mb": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["tiny:fp32", "aquila-100m:fp32", "aquila-100m:bf16"])
    ap.add_argument("--tiny-model", default=os.path.join(os.path.dirname(__file__), "..", "fixtures", "tiny-llama"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--aviary-json", help="output of `aviary bench decode --json` to compare with")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args, args.case)))
        return
    rows = []
    for c in args.cases:
        cmd = [sys.executable, __file__, "--case", c, "--threads", str(args.threads),
               "--tiny-model", args.tiny_model, "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
               "--repeats", str(args.repeats)]
        # The same OpenMP wait policy as the aviary binary sets for itself (tools/aviary/main.cpp;
        # see bench_train.py): a value set by the caller is kept.
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "active")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ours = {}
    if args.aviary_json:
        with open(args.aviary_json) as f:
            ours = {(r["case"], r["dtype"]): r for r in json.load(f)}
    names = {"float32": "fp32", "bfloat16": "bf16"}
    ours = {(k[0], names.get(k[1], k[1])): v for k, v in ours.items()}
    print("| case | dtype | threads | HF prefill tok/s | HF decode tok/s | HF peak MB |"
          " aviary prefill x | aviary decode x | aviary peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = ours.get((r["case"], r["dtype"]))
        extra = (f"{o['prefill_tok_s'] / r['prefill_tok_s']:.2f} | {o['decode_tok_s'] / r['decode_tok_s']:.2f}"
                 f" | {o['peak_rss_mb']:.0f}") if o else "- | - | -"
        print(f"| {r['case']} | {r['dtype']} | {r['threads']} | {r['prefill_tok_s']:.1f} | "
              f"{r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} | {extra} |")


if __name__ == "__main__":
    main()
