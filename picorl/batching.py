"""Token rows into tensors: left padding, positions, shared-prompt rows, chat prompt ids.

Rollout engines, SFT and the GRPO loss all batch token rows the same way, so that a prompt
is the same tokens, at the same positions, wherever it is run:

    left_pad([[5, 6, 7], [8]], pad=0)  ->  [[5, 6, 7], [0, 0, 8]]
    attention mask                     ->  [[1, 1, 1], [0, 0, 1]]
    positions(mask)                    ->  [[0, 1, 2], [0, 0, 0]]

Left padding makes every row end at the right edge: generation appends there, and the
completion (whose log-probs are the loss) is the last K positions of every row. Positions
count real tokens only, so a padded row sees the positions it would see alone.

The k samples of a task share its prompt. `distinct_rows` finds each distinct prompt once,
and `repeat_cache_rows` copies its keys/values to its samples' rows:

    distinct_rows(["a", "a", "b", "a"]) == ([0, 2], [0, 0, 1, 0])
"""
from __future__ import annotations

import itertools

import torch


def left_pad(rows: list[list], fill, dtype=torch.long) -> torch.Tensor:
    """(len(rows), longest) tensor with each row right-aligned and `fill` before it."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r):] = torch.tensor(r, dtype=dtype)
    return out


def left_pad_ids(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, attention mask) of left-padded rows."""
    return left_pad(seqs, pad_id), left_pad([[1] * len(s) for s in seqs], 0)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only (pads sit at 0 and are masked)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int, device):
    """Left-pad token ids, attention mask and completion mask, so completions end aligned."""
    ids, attn = left_pad_ids(seqs, pad_id)
    return ids.to(device), attn.to(device), left_pad(masks, 0, torch.float).to(device)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt up to and including the assistant header."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def distinct_rows(keys: list) -> tuple[list[int], list[int]]:
    """(position of each distinct key's first occurrence, each position's index among those).

    distinct_rows(["a", "a", "b", "a"]) == ([0, 2], [0, 0, 1, 0])
    """
    first: dict = {}
    for pos, k in enumerate(keys):
        first.setdefault(k, pos)
    index = {k: i for i, k in enumerate(first)}
    return list(first.values()), [index[k] for k in keys]


def repeat_cache_rows(cache, owner: list[int]):
    """Make row j of every cached key/value tensor a copy of row owner[j], in place."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no per-layer keys/values to share; "
                        "set grpo.shared_prefix=false for this model")
    for layer in layers:
        layer.keys, layer.values = repeat_rows(layer.keys, owner), repeat_rows(layer.values, owner)
    return cache


def repeat_rows(t: torch.Tensor, owner: list[int]) -> torch.Tensor:
    """t[owner], built from `expand` over runs of equal owners.

    Indexing with repeated rows has a backward that adds into the same row from several
    threads in no fixed order on CPU: gradients would differ in the last bit from run to
    run, and a resumed run would not be bit-identical to an uninterrupted one. The backward
    of `expand` is a sum with a fixed order.
    """
    runs = [(o, len(list(g))) for o, g in itertools.groupby(owner)]
    return torch.cat([t[o:o + 1].expand(n, *t.shape[1:]) for o, n in runs])
