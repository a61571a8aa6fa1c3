"""The frozen base weights' matmuls in bf16 while a LoRA adapter trains (`model.lora.base_dtype`).

Under LoRA the base weights never change, so a bf16 copy made once stays exact to its own
rounding for the whole run. On a CPU with AMX tiles a bf16 matmul runs about 7x a float32
one (2-core Xeon: 2,230 against 320 GFLOP/s at 800 x 576 x 1536; AVX512-BF16 on a 2-core AMD
EPYC: 2.6-5.4x over the layers' shapes at 40-256 rows), and a float32 SFT step of
SmolLM2-135M spends about 64% of its time in matmuls, most of them the base weights' (forward,
and the backward's gradient for the layer's input; a frozen weight needs no gradient of its
own). So within `using(model)` every frozen nn.Linear under an adapter multiplies a bf16
copy of its input by the bf16 copy of its weight, accumulating in float32 (what the AMX
kernel does), and hands a float32 result on; the output head does the same, called or read
by the chunked head (picorl/head_logprobs.py). Everything else stays in the model's dtype: the adapter's
weights and their gradients, norms, attention, softmax, the loss and the optimizer.

Why only inside `using`: the training forwards (grpo.token_logprobs and
shared_prefix_logprobs, which SFT's and GRPO's losses go through) enter it; an eval decodes
with the engines, which read the float32 weights, so a run's reported figures are what
`picorl eval` of its adapter gives.

Worked example of what rounds: a weight 0.123456 is held as 0.123535 (8 significant bits);
an input 1.00390625 as 1.0 (a tie, to even). Each operand moves by at most 2^-8 of itself,
so each product by at most about 2 x 2^-8; the sum over 576 of them accumulates in float32,
and errors of either sign partly cancel.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

ATTR = "_picorl_low_weight"  # the bf16 copy, kept on the module it belongs to


class _LowMatmul(torch.autograd.Function):
    """y = x @ w_low.T in w_low's dtype, returned in x's; the backward gives x's gradient only."""

    @staticmethod
    def forward(ctx, x, w_low, bias):
        ctx.save_for_backward(w_low)
        y = (x.to(w_low.dtype) @ w_low.T).to(x.dtype)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad):
        (w_low,) = ctx.saved_tensors
        return (grad.to(w_low.dtype) @ w_low).to(grad.dtype), None, None


def frozen_base_layers(model) -> list[torch.nn.Linear]:
    """The frozen nn.Linear layers that carry an adapter (peft's `base_layer`s)."""
    return [m for name, m in model.named_modules()
            if name.endswith(".base_layer") and type(m) is torch.nn.Linear and not m.weight.requires_grad]


def attach(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keep a `dtype` copy of every frozen base layer's weight and of the output head's (when it
    is frozen); returns how many layers got one. Only the adapter may train: a base weight that
    requires a gradient would leave its copy stale, so it is refused."""
    layers = frozen_base_layers(model)
    if not layers:
        raise ValueError("bf16 base matmuls need a LoRA adapter over frozen base layers; this model has none")
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and not head.weight.requires_grad:
        layers.append(head)
    for m in layers:
        setattr(m, ATTR, m.weight.detach().to(dtype))
    model._picorl_low_layers = layers
    return len(layers)


def low_weight(module) -> torch.Tensor:
    """The weight a matmul with `module` should use now: its low-precision copy inside `using`."""
    low = getattr(module, ATTR, None)
    return low if low is not None and getattr(module, "_picorl_low_on", False) else module.weight


def _low_forward(module):
    def forward(x):
        return _LowMatmul.apply(x, getattr(module, ATTR), module.bias)
    return forward


@contextmanager
def using(model):
    """Within: the frozen layers `attach` gave copies multiply with them (a no-op for a model
    without them). The backward may run after the block: each matmul saved its copy."""
    layers = getattr(model, "_picorl_low_layers", None)
    if not layers or getattr(layers[0], "_picorl_low_on", False):  # none, or an outer block has them on
        yield
        return
    for m in layers:
        m._picorl_low_on = True  # the chunked head reads the copy through low_weight
        m.forward = _low_forward(m)
    try:
        yield
    finally:
        for m in layers:
            m._picorl_low_on = False
            m.__dict__.pop("forward", None)


def trains_with_copies(fn):
    """Decorate a training forward `fn(model, ...)` so it runs within `using(model)`."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with using(model):
            return fn(model, *args, **kwargs)
    return wrapper
