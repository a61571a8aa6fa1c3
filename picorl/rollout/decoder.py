"""The model's forward pass over engine-owned weights, for the graph engine's decode step.

The engine (picorl/rollout/graph.py) owns the cache, the graphs and sampling; this module
owns what a step computes: which tensors it reads from the model (`weight_specs`), the
copies it keeps of them (`Decoder`), and a forward that writes keys/values into a cache it
is given.

Weights: the engine keeps its own copy, with q/k/v fused into one matrix and gate/up into
another (fewer kernels per layer). A LoRA adapter stays an adapter inside the step (x A^T,
then that times B^T scaled by alpha/r), not merged into the weights: merged into bf16 base
weights, an early update of 1e-3 of a weight's size falls below half a bf16 step (2^-9 to
2^-8 of the weight) and rounds away, and the engine would sample from a stale policy. `sync_weights`
copies only what trains (the adapter, or every weight under full fine-tuning) into the
same buffers, so captured graphs stay valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "qwen2", "qwen3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_TABLE = 32768  # longest prompt + completion the rotary table covers


# ---------------------------------------------------------------- the weights the step reads


def _base(model):
    """The transformers causal LM inside a (possibly PEFT-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_names(module) -> list[str]:
    """Active, unmerged LoRA adapters of a module (none when adapters are off)."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    names = [n for n in module.active_adapters if n in module.lora_A]
    if any(getattr(module, "use_dora", {}).get(n) for n in names):
        raise ValueError("rollout.engine=graph does not run DoRA adapters; use rollout.engine=hf")
    return names


def _linear_weight(module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight


def _linear_bias(module):
    return getattr(getattr(module, "base_layer", module), "bias", None)


@dataclass
class Spec:
    """One engine buffer: how to build it from the model, and whether training changes it."""
    build: callable
    trainable: bool


def _fused_specs(prefix: str, mods: list) -> dict[str, Spec]:
    """Specs of a fused linear over `mods` (outputs concatenated): weight, bias, LoRA A and B.

    Every active adapter of every module becomes rows of one A (R x in) and a block of one
    B (out x R) holding B x scaling, so x A^T B^T adds each module's update to its own
    output slice and nothing to the others.
    """
    specs = {f"{prefix}.weight": Spec(lambda: torch.cat([_linear_weight(m) for m in mods]),
                                      any(_linear_weight(m).requires_grad for m in mods))}
    if any(_linear_bias(m) is not None for m in mods):
        def bias():
            return torch.cat([_linear_bias(m) if _linear_bias(m) is not None
                              else torch.zeros(_linear_weight(m).shape[0], dtype=_linear_weight(m).dtype,
                                               device=_linear_weight(m).device) for m in mods])
        specs[f"{prefix}.bias"] = Spec(bias, any(_linear_bias(m) is not None and _linear_bias(m).requires_grad
                                                 for m in mods))
    parts = [(m, n) for m in mods for n in _lora_names(m)]
    if parts:
        def lora_a():
            return torch.cat([m.lora_A[n].weight for m, n in parts])

        first_row, rows = {}, 0  # where each module's output slice starts in the fused output
        for m in mods:
            first_row[id(m)], rows = rows, rows + _linear_weight(m).shape[0]

        def lora_b():
            ref = parts[0][0].lora_B[parts[0][1]].weight
            out = torch.zeros(rows, sum(m.lora_A[n].weight.shape[0] for m, n in parts), dtype=ref.dtype, device=ref.device)
            col = 0
            for m, n in parts:
                b, r = m.lora_B[n].weight, first_row[id(m)]
                out[r:r + b.shape[0], col:col + b.shape[1]] = b * m.scaling[n]
                col += b.shape[1]
            return out
        trains = any(m.lora_A[n].weight.requires_grad or m.lora_B[n].weight.requires_grad for m, n in parts)
        specs[f"{prefix}.lora_a"] = Spec(lora_a, trains)
        specs[f"{prefix}.lora_b"] = Spec(lora_b, trains)
    return specs


def weight_specs(model) -> dict[str, Spec]:
    """Every tensor the decode step reads, by name, built from the model's current weights."""
    lm = _base(model)
    cfg = lm.config
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"rollout.engine=graph runs {', '.join(SUPPORTED)} models, not {cfg.model_type!r}; "
                         "use rollout.engine=hf")
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError("rollout.engine=graph needs full attention and a SiLU MLP; use rollout.engine=hf")
    for name, mod in lm.named_modules():
        if _lora_names(mod) and name.rsplit(".", 1)[-1] not in PROJECTIONS:
            raise ValueError(f"rollout.engine=graph runs LoRA on {', '.join(PROJECTIONS)} only, not on {name}")

    def param(t):
        return Spec(lambda: t, t.requires_grad)

    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    specs = {"embed": param(emb), "norm": param(lm.model.norm.weight)}
    if head is not emb:
        specs["lm_head"] = param(head)
    for i, layer in enumerate(lm.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        specs[f"{i}.input_norm"] = param(layer.input_layernorm.weight)
        specs[f"{i}.post_norm"] = param(layer.post_attention_layernorm.weight)
        if hasattr(a, "q_norm"):  # qwen3 normalises each head's queries and keys before rotary
            specs[f"{i}.q_norm"], specs[f"{i}.k_norm"] = param(a.q_norm.weight), param(a.k_norm.weight)
        specs.update(_fused_specs(f"{i}.qkv", [a.q_proj, a.k_proj, a.v_proj]))
        specs.update(_fused_specs(f"{i}.o", [a.o_proj]))
        specs.update(_fused_specs(f"{i}.gate_up", [mlp.gate_proj, mlp.up_proj]))
        specs.update(_fused_specs(f"{i}.down", [mlp.down_proj]))
    return specs


# ---------------------------------------------------------------- the forward pass


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm, operation for operation (float32 inside, then the weight)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Decoder:
    """The model's forward over engine-owned weights, writing keys/values into a given cache."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        specs = weight_specs(model)  # first: it names an unsupported model before its config is read
        lm = _base(model)
        cfg = lm.config
        self.layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.vocab = cfg.vocab_size
        ref = lm.get_input_embeddings().weight
        self.dtype, self.device = dtype or ref.dtype, ref.device
        # One dtype for every buffer: PEFT keeps adapter weights in float32 beside a bf16 base,
        # and a matmul of bf16 activations with a float32 matrix is an error. sync() copies
        # into these buffers, so later updates are cast the same way. `dtype` other than the
        # model's (rollout.dtype): bf16 copies of a float32 policy, as vLLM serves one.
        self.w = {name: spec.build().detach().to(self.dtype, copy=True) for name, spec in specs.items()}
        if "lm_head" not in self.w:
            self.w["lm_head"] = self.w["embed"]  # tied: one buffer serves both
        # The rotary tables for every position a call can reach, computed once by the model's
        # own rotary module (so scaled variants such as llama3's come out right).
        positions = min(getattr(cfg, "max_position_embeddings", MAX_TABLE) or MAX_TABLE, MAX_TABLE)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = lm.model.rotary_emb(probe, torch.arange(positions, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # (positions, head_dim)

    @torch.no_grad()
    def sync(self, model) -> int:
        """Copy what training changes into the engine's buffers; returns the bytes copied."""
        copied = 0
        for name, spec in weight_specs(model).items():
            if spec.trainable:
                src = spec.build()
                if src.shape != self.w[name].shape:
                    raise ValueError(f"rollout.engine=graph: {name} changed shape {tuple(self.w[name].shape)} -> "
                                     f"{tuple(src.shape)}; build a new engine for a new model")
                self.w[name].copy_(src)
                copied += src.numel() * src.element_size()
        return copied

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))
        a = self.w.get(f"{name}.lora_a")
        return y if a is None else y + F.linear(F.linear(x, a), self.w[f"{name}.lora_b"])

    def attention(self, q, k_cache, v_cache, mask):
        """Grouped-query attention over the whole cache without repeating its heads.

        q: (B, heads, L, d); caches (B, kv_heads, S, d); mask (B, 1, L, S) boolean. The g
        query heads of a key/value head are stacked along the query axis (as
        picorl/attention.py does), so one SDPA call per key/value head reads the cache as is.
        """
        b, h, length, d = q.shape
        g = h // self.kv_heads
        q = q.reshape(b, self.kv_heads, g * length, d)
        if length > 1:
            mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, 1, g * length, mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=self.scale)
        return out.reshape(b, h, length, d).transpose(1, 2).reshape(b, length, h * d)

    def forward(self, ids, positions, caches, write_cols, mask) -> torch.Tensor:
        """Final hidden states of `ids` (B, L) at `positions` (B, L).

        Writes each layer's new keys/values into cache columns `write_cols` (L,) of
        caches = (keys, values), each (layers, B, kv_heads, S, d); attends over all S
        columns where `mask` (B, 1, L, S) is true.
        """
        w, (b, length) = self.w, ids.shape
        x = F.embedding(ids, w["embed"])
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, L, d)
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        for i in range(self.layers):
            h = rms_norm(x, w[f"{i}.input_norm"], self.eps)
            q, k, v = self.linear(f"{i}.qkv", h).split(sizes, dim=-1)
            q = q.view(b, length, self.heads, self.head_dim)
            k = k.view(b, length, self.kv_heads, self.head_dim)
            if f"{i}.q_norm" in w:
                q, k = rms_norm(q, w[f"{i}.q_norm"], self.eps), rms_norm(k, w[f"{i}.k_norm"], self.eps)
            q = rotate(q.transpose(1, 2), cos, sin)
            k = rotate(k.transpose(1, 2), cos, sin)
            v = v.view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
            caches[0][i].index_copy_(2, write_cols, k)
            caches[1][i].index_copy_(2, write_cols, v)
            x = x + self.linear(f"{i}.o", self.attention(q, caches[0][i], caches[1][i], mask))
            gate, up = self.linear(f"{i}.gate_up", rms_norm(x, w[f"{i}.post_norm"], self.eps)).chunk(2, dim=-1)
            x = x + self.linear(f"{i}.down", F.silu(gate) * up)
        return rms_norm(x, w["norm"], self.eps)

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_last, self.w["lm_head"]).float()

    def new_cache(self, rows: int, columns: int) -> torch.Tensor:
        return torch.zeros(2, self.layers, rows, self.kv_heads, columns, self.head_dim,
                           dtype=self.dtype, device=self.device)
