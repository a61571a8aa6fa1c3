"""Grouped-query attention without copying the keys/values: `grouped_sdpa`.

SmolLM2-135M has 9 query heads and 3 key/value heads. With a padding mask (every batched
rollout and loss has one: prompts are left-padded), transformers' `sdpa` attention cannot
ask torch for GQA and repeats each key/value head 3 times first: a full copy of the cache
in every layer at every decode step. At 64 rollouts on a 2-core CPU that copy was 42% of
the rollout's time.

The copy is avoidable: the g query heads that share a key/value head can be stacked along
the query-length axis, (b, kv, g * L, d), so one SDPA call per key/value head serves all g
of them with the cache as it is; the mask is repeated g times along the query axis (small:
L x S, not the cache). The result equals the repeated-heads computation (tests compare).

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="grouped_sdpa")
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                 is_causal=None, **kwargs):
    g = getattr(module, "num_key_value_groups", 1)
    plain = (g == 1 or attention_mask is None or attention_mask.shape[1] != 1
             or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None)
    if plain:  # nothing to save (no GQA), or torch's own GQA applies (no mask): transformers' path
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    b, h, length, d = query.shape
    kv = key.shape[1]
    # Query head i reads key/value head i // g, so heads are already grouped kv-major.
    q = query.reshape(b, kv, g * length, d)
    mask = attention_mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(attention_mask.shape[0], 1, g * length, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(b, h, length, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same boolean masks as sdpa
