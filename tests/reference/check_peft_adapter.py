#!/usr/bin/env python3
"""Checks a LoRA adapter (or a merged export) written by Aviary against HF transformers + peft.

    ~/.cache/aviary/venv/bin/python tests/reference/check_peft_adapter.py \
        --base tests/fixtures/tiny-llama --adapter OUT/adapter --expected OUT/logits.safetensors
    ~/.cache/aviary/venv/bin/python tests/reference/check_peft_adapter.py \
        --merged OUT/merged --expected OUT/logits.safetensors

--expected is a safetensors file with `input_ids` (integer [B, T]) and `logits` ([B, T, V], any
float dtype), the logits Aviary computed for those ids. The script loads the base model with
transformers (fp32, eager attention) and the adapter with PeftModel.from_pretrained, or with
--merged a plain HF model directory, runs `input_ids` and compares the logits.

The adapter's tensors must all be used by peft, and every LoRA tensor peft expects must be in the
file (peft itself only warns about unknown or missing keys and would silently run with its own
initialisation); likewise a merged model must load without missing or unexpected weights.

Exit status: 0 the max abs difference is <= --atol; 1 it is not, or the adapter/model/expected
file is unusable (the message says why); 2 usage error; 3 peft (or torch/transformers/safetensors)
is not installed, which the C++ tests treat as a skip.
"""
import argparse
import os
import sys
import warnings


def fail(msg, code=1):
    print(f"check_peft_adapter: FAIL: {msg}", file=sys.stderr)
    sys.exit(code)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="HF base model directory (with --adapter)")
    ap.add_argument("--adapter", help="peft adapter directory (adapter_config.json + weights)")
    ap.add_argument("--merged", help="plain HF model directory to check instead of base + adapter")
    ap.add_argument("--expected", required=True,
                    help="safetensors with input_ids and logits computed by Aviary")
    ap.add_argument("--atol", type=float, default=1e-5)
    args = ap.parse_args()
    if args.merged:
        if args.base or args.adapter:
            ap.error("--merged excludes --base/--adapter")
    elif not (args.base and args.adapter):
        ap.error("give --base and --adapter, or --merged")

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations
    try:
        import peft
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except ImportError as e:
        print(f"check_peft_adapter: peft not installed ({e})", file=sys.stderr)
        sys.exit(3)
    try:
        import torch
        import transformers
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"check_peft_adapter: peft not installed: a dependency is missing ({e})",
              file=sys.stderr)
        sys.exit(3)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    for d in (args.base, args.adapter, args.merged):
        if d and not os.path.isdir(d):
            fail(f"{d}: not a directory", 2)
    if not os.path.isfile(args.expected):
        fail(f"{args.expected}: no such file", 2)
    expected = load_file(args.expected)
    for k in ("input_ids", "logits"):
        if k not in expected:
            fail(f"{args.expected} has no tensor '{k}' (has: {sorted(expected)})")
    ids = expected["input_ids"].to(torch.int64)
    want = expected["logits"].float()
    if ids.dim() == 1:
        ids = ids[None]
    if want.dim() == 2:
        want = want[None]

    def load_model(path):
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager",
                output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - any loader error is a failed check
            fail(f"transformers cannot load {path}: {type(e).__name__}: {e}")
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                       "mismatched_keys") and v}
        if bad:
            fail(f"{path}: weights do not match the model: {bad}")
        return model.eval()

    if args.merged:
        model = load_model(args.merged)
        what = f"merged model {args.merged}"
    else:
        base = load_model(args.base)
        try:
            model = PeftModel.from_pretrained(base, args.adapter).eval()
        except Exception as e:  # noqa: BLE001
            fail(f"peft {peft.__version__} cannot load the adapter {args.adapter}: "
                 f"{type(e).__name__}: {e}")
        st = os.path.join(args.adapter, "adapter_model.safetensors")
        if os.path.isfile(st):
            saved = load_file(st)
            live = get_peft_model_state_dict(model)
            unused = sorted(set(saved) - set(live))
            missing = sorted(set(live) - set(saved))
            if unused or missing:
                fail(f"adapter keys differ from what peft expects: not used by peft {unused[:8]}"
                     f"{' ...' if len(unused) > 8 else ''}; expected but missing {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}")
            for k, v in saved.items():
                if tuple(v.shape) != tuple(live[k].shape):
                    fail(f"adapter tensor {k}: shape {tuple(v.shape)}, peft expects "
                         f"{tuple(live[k].shape)}")
        what = f"base {args.base} + adapter {args.adapter} (peft {peft.__version__})"

    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    if got.shape != want.shape:
        fail(f"logits shape: {tuple(want.shape)} in {args.expected}, "
             f"{tuple(got.shape)} from {what}")
    if not torch.isfinite(want).all():
        fail(f"{args.expected}: logits contain NaN/inf")
    diff = (got - want).abs().max().item()
    print(f"check_peft_adapter: {what}: max abs logits diff {diff:.3g} "
          f"(atol {args.atol:g}, max |logit| {got.abs().max().item():.3g}, ids {tuple(ids.shape)})")
    if not diff <= args.atol:
        fail(f"max abs logits diff {diff:.3g} > atol {args.atol:g}")
    print("check_peft_adapter: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
