"""Log-probs of chosen tokens through the output head, a chunk of positions at a time.

GRPO needs log p(token) at each completion position, nothing else of the vocabulary. The
plain way (the model's logits, then log_softmax and gather) holds a (positions x vocab)
logits tensor, a float32 copy of it and the softmax saved for the backward. For SmolLM2 at
128 completions x 384 tokens that is 49,152 positions x 49,152 vocab: 9.7 GB per float32
copy. Here the hidden states go through the head `chunk` positions at a time; the forward
keeps only each position's chosen log-prob and its log-sum-exp, and the backward recomputes
one chunk's logits to form that chunk's gradient (the idea of Liger's fused linear
cross-entropy and of Cut Cross-Entropy). The peak is one chunk's logits.

Worked example, one position, vocab of 3, logits z = [2, 0, -1], chosen token 0:
    lse = log(e^2 + e^0 + e^-1) = 2.1698;  log p = z[0] - lse = -0.1698
    d log p / d z = onehot(0) - softmax(z) = [1 - 0.844, -0.114, -0.042]
The backward forms exactly that row, times the incoming gradient, from z recomputed and the
saved lse; d/d hidden = row @ W and d/d W += row^T hidden.

Same math as log_softmax + gather, in the same dtypes (a bf16 head's logits go to float32
before the log-sum-exp, as `at_least_float32` does): tests/test_grpo.py checks values and
gradients in float64 and a resumed run's determinism (chunks run in a fixed order). A
weight of lower precision than the hidden states (the head's bf16 copy under
`model.lora.base_dtype`, picorl/base_matmuls.py) multiplies the hidden states rounded to it.
"""
from __future__ import annotations

import torch

from picorl.base_matmuls import low_weight


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _SelectedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk].to(weight.dtype) @ weight.T).to(acc)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        acc = lse.dtype
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g_out = hidden[s:s + ctx.chunk], grad[s:s + ctx.chunk].to(acc)
            logits = (h.to(weight.dtype) @ weight.T).to(acc)
            # d log p / d logits = onehot(target) - softmax, scaled by the incoming gradient
            g = torch.exp(logits - lse[s:s + ctx.chunk, None]).mul_(-g_out[:, None])
            g.scatter_add_(-1, targets[s:s + ctx.chunk, None], g_out[:, None])
            if need_hidden:
                grad_hidden[s:s + ctx.chunk] = g.to(weight.dtype) @ weight
            if need_weight:
                grad_weight += g.to(hidden.dtype).T @ h
        return grad_hidden, grad_weight, None, None


def selected_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[i, targets[i]] for each row i of hidden (N, H), with weight
    (V, H) and targets (N,); at least float32. Holds one (chunk x V) block of logits at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 positions, got {chunk}")
    return _SelectedLogprobs.apply(hidden, weight, targets, chunk)


def plain_head(model) -> torch.Tensor | None:
    """The output head's weight when the logits are exactly hidden @ weight.T (a bias-free
    nn.Linear, no logit scaling or soft-capping); None otherwise, and callers take the logits."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    scaled = any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    if type(head) is not torch.nn.Linear or head.bias is not None or scaled:
        return None
    return low_weight(head)  # its bf16 copy while model.lora.base_dtype's matmuls are on


def masked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """(batch, seq) log-probs of targets where mask is set, 0 elsewhere: padding never goes
    through the head."""
    keep = mask.bool()
    out = torch.zeros(mask.shape, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    return out.index_put((keep,), selected_logprobs(hidden[keep], weight, targets[keep], chunk))
