#!/usr/bin/env python3
"""A compact eager-PyTorch LLaMA/Aquila decoder for the training references.

    from train_model import Llama, config_from_hf, load_pretrained
    model = load_pretrained("tests/fixtures/tiny-llama")           # HF dir, fp32
    model = Llama(config_from_hf(json.load(open("config.json"))))  # random init

Used by train_reference.py (the trainer parity fixture) and bench_train.py (the eager anchor for
`aviary bench train`). It is meant to be the fairest eager PyTorch, not a slow strawman: fused
`F.rms_norm`, `F.scaled_dot_product_attention` with native GQA, no per-step caches or masks to
build. Parameter names and their registration order are those of transformers'
LlamaForCausalLM, so an HF `model.safetensors` loads with strict=True and `named_parameters()`
lists parameters in HF order (which the optimizer groups depend on). RoPE is HF's rotate-half
form with cos/sin computed as HF does (fp32 freqs = positions * inv_freq, cat(freqs, freqs)).
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # linear RoPE scaling: positions / factor
    tie_word_embeddings: bool = False


def config_from_hf(hf):
    """LlamaConfig from an HF config.json dict, either transformers spelling of RoPE settings:
    < 5 (`rope_theta` + `rope_scaling`) or 5 (`rope_parameters` holding both)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        factor = float(rope["factor"])
    elif rope_type == "default":
        factor = 1.0
    else:  # dynamic NTK etc. would silently give other numbers than the C++ side expects
        raise ValueError(f"unsupported rope type {rope_type!r}")
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf["max_position_embeddings"], rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=float(theta), rope_linear_factor=factor,
        tie_word_embeddings=hf.get("tie_word_embeddings", False))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        # cos/sin are fp32; cast to the activation dtype as HF does (matters under autocast).
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        # Registration order = HF's, so named_parameters() order matches LlamaDecoderLayer.
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Llama(nn.Module):
    """LlamaForCausalLM without generation: forward(ids [B, L]) -> logits [B, L, V]."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # HF's default RoPE init: fp32 exponents from int64 arange; linear scaling divides
        # inv_freq (equivalently the positions) by the factor. Not persistent, as in HF.
        d = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv_freq / config.rope_linear_factor, persistent=False)

    def rope(self, n, device):
        freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, ids):
        cos, sin = self.rope(ids.shape[1], ids.device)
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def load_pretrained(model_dir):
    """An fp32 Llama from an HF dir with config.json and a single model.safetensors."""
    from safetensors.torch import load_file
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        model = Llama(config_from_hf(json.load(f)))
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    if model.config.tie_word_embeddings:  # HF saves a tied head once, under the embedding name
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def count_params(model):
    return sum(p.numel() for p in model.parameters())  # tied weights count once
