#!/usr/bin/env python3
"""Generates tests/fixtures/rope/ from the rotary embeddings of HF transformers (GPT-J) and timm
(EVA-02), the oracles of ops::apply_rope(x, positions, RopeSpec) in its two non-LLaMA forms.

    ~/.cache/aviary/venv/bin/python tests/reference/make_rope_fixtures.py [--out DIR]

Tensors are in Aviary's attention layout x [B, H, T, D] (fp32); each case also holds a seeded
upstream gradient `g` and `dx` = d sum(out * g) / dx through the reference's own autograd.

  gptj.*   transformers.models.gptj: create_sinusoidal_positions(64, rotary_dim=16) indexed by
           position_ids, apply_rotary_pos_emb (rotate_every_two, i.e. interleaved pairs) on the
           first 16 of D=32 features, the rest passed through, as GPTJAttention does.
           positions int64 [2, 13]: row 0 is 0..12, row 1 is 40..52. theta 10000.
  eva.*    timm.layers.RotaryEmbeddingCat(dim=32, in_pixels=False, feat_shape=[4, 6],
           ref_feat_shape=[8, 12]) (EVA-02's 'cat' RoPE, fine-tuned at half the pretraining grid:
           position_scale 2), get_embed() applied with apply_rot_embed_cat(half=False) to all of
           D=32, as timm's EvaAttention does to the patch tokens. positions int64 [1, 24, 2]:
           the (row, column) of each patch, row-major. theta 10000.
  eva_noref.*  the same without ref_feat_shape (position_scale 1), temperature 100.

Outputs: expected.safetensors (the tensors above) and expected.json (versions and settings).
"""
import argparse
import json
import os

import safetensors.torch
import timm
import torch
import transformers
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions


def with_grad(fn, x, gen):
    x = x.clone().requires_grad_()
    out = fn(x)
    g = torch.randn(out.shape, generator=gen)
    (dx,) = torch.autograd.grad(out, x, g)
    return out.detach(), g, dx


def gptj_case(gen):
    B, H, T, D, R = 2, 3, 13, 32, 16
    positions = torch.stack([torch.arange(T), torch.arange(40, 40 + T)])
    table = create_sinusoidal_positions(64, R)  # [max_pos, R]: sin | cos

    def rope(x):  # x [B, H, T, D] -> GPT-J's [B, T, H, D] and back
        xt = x.transpose(1, 2)
        sincos = table[positions]
        sin, cos = torch.split(sincos, R // 2, dim=-1)
        rot = apply_rotary_pos_emb(xt[..., :R], sin, cos)
        return torch.cat([rot, xt[..., R:]], dim=-1).transpose(1, 2)

    x = torch.randn(B, H, T, D, generator=gen)
    out, g, dx = with_grad(rope, x, gen)
    settings = dict(style="interleaved", rotary_dim=R, theta=10000.0, position_scale=1.0)
    return dict(x=x, positions=positions, out=out, g=g, dx=dx), settings


def eva_case(gen, ref_feat_shape, temperature):
    B, H, D = 2, 3, 32
    feat = [4, 6]
    rope = RotaryEmbeddingCat(dim=D, in_pixels=False, feat_shape=feat,
                              ref_feat_shape=ref_feat_shape, temperature=temperature)
    emb = rope.get_embed()  # [24, 2 * D]
    rows, cols = torch.meshgrid(torch.arange(feat[0]), torch.arange(feat[1]), indexing="ij")
    positions = torch.stack([rows.reshape(-1), cols.reshape(-1)], -1).unsqueeze(0)  # [1, 24, 2]
    x = torch.randn(B, H, feat[0] * feat[1], D, generator=gen)
    out, g, dx = with_grad(lambda t: apply_rot_embed_cat(t, emb, half=False), x, gen)
    scale = 1.0 if ref_feat_shape is None else ref_feat_shape[0] / feat[0]
    settings = dict(style="interleaved", rotary_dim=0, theta=float(temperature),
                    position_scale=scale, feat_shape=feat, ref_feat_shape=ref_feat_shape)
    return dict(x=x, positions=positions, out=out, g=g, dx=dx), settings


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fixtures",
                                                      "rope"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    cases = {"gptj": gptj_case(gen), "eva": eva_case(gen, [8, 12], 10000),
             "eva_noref": eva_case(gen, None, 100)}
    tensors, meta = {}, {"versions": {"torch": torch.__version__.split("+")[0],
                                      "transformers": transformers.__version__,
                                      "timm": timm.__version__}, "cases": {}}
    for name, (t, settings) in cases.items():
        for key, value in t.items():
            tensors[f"{name}.{key}"] = value.contiguous()
        meta["cases"][name] = settings
    safetensors.torch.save_file(tensors, os.path.join(args.out, "expected.safetensors"))
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors to {args.out}")


if __name__ == "__main__":
    main()
