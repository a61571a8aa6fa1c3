"""Drawing the next token on the device: one uniform number per row, no host round trip.

`torch.multinomial` draws one random number per vocabulary entry (3M per step at 64 rows x
SmolLM2's 49k vocabulary: 63 ms on a 2-core CPU). Inverting the cumulative distribution
needs one uniform per row; it is a few sums and binary searches with fixed shapes, so on a
GPU it can live inside a captured CUDA graph.

Worked example, one row: probs [0.5, 0.3, 0.2], uniform 0.6 -> cdf [0.5, 0.8, 1.0] -> the
first entry above 0.6 is token 1. With top_p 0.7 the nucleus is tokens {0, 1} (the smallest
set, most probable first, holding >= 70% of the mass): probs [0.5, 0.3, 0] and the same
uniform gives 0.6 x 0.8 = 0.48 -> token 0.
"""
from __future__ import annotations

import torch


BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF


def sample_inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Token index per row of `probs` (rows need not sum to 1), chosen by `uniform` in [0, 1].

    Returns the first token whose cumulative probability exceeds uniform x row total, as a
    (rows, 1) tensor. The draw is clamped just below the total, so a token of probability
    zero (outside the top-p nucleus) can never be chosen, even at uniform == 1.

    Two levels, so no running sum covers the whole vocabulary: the vocabulary is cut into
    blocks of 256, the draw first picks a block from the blocks' running masses, then a
    token from the running sum inside that block. Both sums are float64 (a 49k-term running
    sum in float32 drifts). A whole-vocabulary float64 running sum needs a float64 copy of
    every probability (2M at 40 rows x SmolLM2's 49k vocabulary) and a sequential pass over
    it, at every decode step; the block masses are one vectorised pass, the running sums
    cover 192 masses and 256 probabilities a row. Worked example, blocks of 2: probs
    [0.1, 0.1 | 0.5, 0.3], uniform 0.5 -> block masses [0.2, 0.8], running [0.2, 1.0] ->
    block 1, with 0.5 - 0.2 = 0.3 left -> running sum inside it [0.5, 0.8] -> its token 0,
    token 2 overall: the one the whole-vocabulary running sum [0.1, 0.2, 0.7, 1.0] picks.
    """
    rows, vocab = probs.shape
    blocks = -(-vocab // BLOCK)
    if blocks * BLOCK != vocab:  # zeros at the end: they add no mass and are never drawn
        probs = torch.nn.functional.pad(probs, (0, blocks * BLOCK - vocab))
    grid = probs.reshape(rows, blocks, BLOCK)
    block_cdf = grid.sum(-1, dtype=torch.float64).cumsum(-1)
    total = block_cdf[:, -1:]
    u = torch.minimum(uniform.double().view(-1, 1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # NaN probabilities (a model whose weights went NaN) make searchsorted return the number of
    # entries; gathering there is a device-side assert on a GPU, which ends the CUDA context for
    # the whole process. Clamped, the rollout finishes and the trainer names the non-finite loss.
    block = torch.searchsorted(block_cdf, u, right=True).clamp_(max=blocks - 1)  # (rows, 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(u))
    inner = grid.gather(1, block[:, :, None].expand(-1, -1, BLOCK)).squeeze(1).double().cumsum(-1)
    # The block's own running total can differ from its mass above in the last bit (another
    # summation order): clamped below it, the draw stays on a token of non-zero probability.
    rest = torch.minimum(u - before, torch.nextafter(inner[:, -1:], torch.zeros_like(u)))
    token = block * BLOCK + torch.searchsorted(inner, rest, right=True).clamp_(max=BLOCK - 1)
    return token.clamp_(max=vocab - 1)


def sample_tokens(logits: torch.Tensor, temperature, top_p, uniform: torch.Tensor,
                  nucleus: bool) -> torch.Tensor:
    """(rows,) token ids drawn from softmax(logits / temperature), restricted to the top-p nucleus.

    temperature and top_p may be floats or 0-d/1-element tensors (a captured graph reads
    them from device buffers, so one graph serves every value). `nucleus=False` skips the
    sort that top-p needs (top_p == 1 keeps every token anyway).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not nucleus:
        return sample_inverse_cdf(probs, uniform).squeeze(-1)
    # Most probable first; keep a token while the mass before it is below top_p, so the
    # most probable token is always kept (the same set transformers' TopPLogitsWarper keeps).
    sorted_p, order = probs.sort(dim=-1, descending=True)
    kept = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < top_p)
    return order.gather(-1, sample_inverse_cdf(kept, uniform)).squeeze(-1)
