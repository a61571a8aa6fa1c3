"""Drawing the next token on the device: one uniform number per row, no host round trip.

`torch.multinomial` draws one random number per vocabulary entry (3M per step at 64 rows x
SmolLM2's 49k vocabulary: 63 ms on a 2-core CPU). Inverting the cumulative distribution
needs one uniform per row and costs about 1.5 ms there; on a GPU it is a cumsum and a
binary search, and it has fixed shapes, so it can live inside a captured CUDA graph.

Worked example, one row: probs [0.5, 0.3, 0.2], uniform 0.6 -> cdf [0.5, 0.8, 1.0] -> the
first entry above 0.6 is token 1. With top_p 0.7 the nucleus is tokens {0, 1} (the smallest
set, most probable first, holding >= 70% of the mass): probs [0.5, 0.3, 0] and the same
uniform gives 0.6 x 0.8 = 0.48 -> token 0.
"""
from __future__ import annotations

import torch


def sample_inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Token index per row of `probs` (rows need not sum to 1), chosen by `uniform` in [0, 1].

    Returns the first token whose cumulative probability exceeds uniform x row total, as a
    (rows, 1) tensor. The draw is clamped just below the total, so a token of probability
    zero (outside the top-p nucleus) can never be chosen, even at uniform == 1.
    """
    cdf = probs.double().cumsum(-1)  # float64: a 49k-term running sum in float32 drifts
    total = cdf[:, -1:]
    u = torch.minimum(uniform.double().view(-1, 1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # NaN probabilities (a model whose weights went NaN) make searchsorted return the vocabulary
    # size; gathering there is a device-side assert on a GPU, which ends the CUDA context for the
    # whole process. Clamped, the rollout finishes and the trainer names the non-finite loss.
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


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
