#!/usr/bin/env python3
"""Generates the tiny LLaMA/Aquila fixtures under tests/fixtures/ with HF transformers.

    ~/.cache/aviary/venv/bin/python tests/reference/make_llama_fixtures.py

Outputs (all small, deterministic for a given transformers/torch version):
  tiny-llama/                 HF model dir: config.json, model.safetensors (fp32), tokenizer files
                              copied from tokenizers/bpe (GPT-2-style byte-level BPE, Aquila added
                              tokens), generation_config.json.
  tiny-llama/expected.json    prompts, their ids, greedy generations (single and batched with left
                              padding), and the bf16 error of transformers itself.
  tiny-llama/logits.safetensors  fp32 and bf16 reference logits for the parity prompt.
  tiny-llama-variants/        the same weights as sharded safetensors + index, sharded
                              pytorch_model-*.bin + index, and FlagAI-native names (interleaved
                              rotary rows) in one pytorch_model.bin.

The model has GQA (4 query heads, 2 KV heads), rope_theta != 10000 and linear rope scaling, as
the foundation issue requires. Requires tests/fixtures/tokenizers (make_tokenizer_fixtures.py).
"""
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
TOK_DIR = os.path.join(ROOT, "tokenizers", "bpe")
OUT = os.path.join(ROOT, "tiny-llama")
VARIANTS = os.path.join(ROOT, "tiny-llama-variants")

PROMPTS = [
    "The quick brown fox",
    "天下大事，必作于细。",
    "def add(a, b):\n    return a + b",
    "Hello",
]
PARITY_TEXT = "Aviary runs Aquila models: 悟已往之不谏，知来者之可追。 <|endofpiece|> 42!"


def hf_permute(w, n_heads):
    """HF's convert_llama_weights_to_hf permute: interleaved (Meta/FlagAI) rows -> rotate-half."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_unpermute(w, n_heads):
    """Inverse of hf_permute: rotate-half rows -> the interleaved layout FlagAI checkpoints use."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def flagai_state(model, cfg):
    out = {
        "tok_embeddings.weight": model.model.embed_tokens.weight,
        "norm.weight": model.model.norm.weight,
        "output.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        p = f"layers.{i}."
        out[p + "attention.wq.weight"] = hf_unpermute(a.q_proj.weight, cfg.num_attention_heads)
        out[p + "attention.wk.weight"] = hf_unpermute(a.k_proj.weight, cfg.num_key_value_heads)
        out[p + "attention.wv.weight"] = a.v_proj.weight
        out[p + "attention.wo.weight"] = a.o_proj.weight
        out[p + "feed_forward.w1.weight"] = m.gate_proj.weight
        out[p + "feed_forward.w2.weight"] = m.down_proj.weight
        out[p + "feed_forward.w3.weight"] = m.up_proj.weight
        out[p + "attention_norm.weight"] = layer.input_layernorm.weight
        out[p + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
        # Round-trip check of the permutation pair itself.
        assert torch.equal(hf_permute(out[p + "attention.wq.weight"], cfg.num_attention_heads),
                           a.q_proj.weight)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def greedy(model, ids_list, pad_id, max_new_tokens=32):
    """Greedy generation with left padding, as a batch."""
    width = max(len(x) for x in ids_list)
    input_ids = torch.full((len(ids_list), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), width), dtype=torch.long)
    for i, ids in enumerate(ids_list):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    results = []
    eos = model.config.eos_token_id
    for row in out[:, width:].tolist():
        if eos in row:  # HF pads finished rows; keep up to and including eos
            row = row[:row.index(eos) + 1]
        results.append(row)
    return results


def main():
    torch.manual_seed(20261128)
    tok = Tokenizer.from_file(os.path.join(TOK_DIR, "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=50000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
        tie_word_embeddings=False, bos_token_id=tok.token_to_id("[CLS]"),
        eos_token_id=tok.token_to_id("</s>"), pad_token_id=0,
        # Wider than the usual 0.02 so that logits are well separated and greedy decoding does
        # not hinge on 1e-7 differences between implementations.
        initializer_range=0.25, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    cfg.architectures = ["LlamaForCausalLM"]

    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(TOK_DIR, name), os.path.join(OUT, name))

    # Reference outputs.
    prompt_ids = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    parity_ids = tok.encode(PARITY_TEXT, add_special_tokens=False).ids
    with torch.no_grad():
        logits32 = model(torch.tensor([parity_ids])).logits[0].float().contiguous()
        model_bf16 = LlamaForCausalLM.from_pretrained(OUT, dtype=torch.bfloat16).eval()
        logits16 = model_bf16(torch.tensor([parity_ids])).logits[0].float().contiguous()
        single = [greedy(model, [ids], 0)[0] for ids in prompt_ids]
        batched = greedy(model, prompt_ids, 0)
    save_file({"fp32": logits32, "bf16": logits16}, os.path.join(OUT, "logits.safetensors"))
    bf16_err = (logits16 - logits32).abs().max().item()
    expected = {
        "generated_by": {"transformers": transformers.__version__, "torch": torch.__version__},
        "parity_text": PARITY_TEXT,
        "parity_ids": parity_ids,
        "prompts": PROMPTS,
        "prompt_ids": prompt_ids,
        "greedy_32": single,
        "greedy_32_batched": batched,
        "hf_bf16_max_abs_error": bf16_err,
    }
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)

    # Loader variants with the same weights.
    shutil.rmtree(VARIANTS, ignore_errors=True)
    model.save_pretrained(os.path.join(VARIANTS, "sharded-safetensors"), safe_serialization=True,
                          max_shard_size="150KB")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    bin_dir = os.path.join(VARIANTS, "sharded-bin")
    os.makedirs(bin_dir)
    names = list(state)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in shard}, os.path.join(bin_dir, fname))
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(bin_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    flag_dir = os.path.join(VARIANTS, "flagai")
    os.makedirs(flag_dir)
    torch.save(flagai_state(model, cfg), os.path.join(flag_dir, "pytorch_model.bin"))
    for d in (bin_dir, flag_dir, os.path.join(VARIANTS, "sharded-safetensors")):
        shutil.copy(os.path.join(OUT, "config.json"), os.path.join(d, "config.json"))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(os.path.join(TOK_DIR, name), os.path.join(d, name))
    print(f"wrote {OUT} and {VARIANTS}; hf bf16 max abs error {bf16_err:.4g}")


if __name__ == "__main__":
    sys.exit(main())
