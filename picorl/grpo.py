"""The GRPO family: advantages, per-token log-probs (of full sequences, or of completions on a
shared prompt), the clipped loss and its aggregations, the KL penalty.

Worked example. One task is sampled k=4 times; the completions score [1, 0, 0, 1]:
    group mean 0.5, unbiased std 0.577
    group_advantages([1,0,0,1], 4, scale="group") -> [0.866, -0.866, -0.866, 0.866]
    scale="none" (Dr. GRPO)                        -> [0.5, -0.5, -0.5, 0.5]
A second task scoring [1, 1, 1, 1] has zero variance: every advantage is 0 and it teaches
nothing (counted in `frac_zero_var_groups`; DAPO's dynamic sampling resamples it).

With one pass over fresh rollouts the ratio r = exp(logp - old_logp) is 1, so each token's
loss is -A * logp and its gradient pushes the right answers up and the wrong ones down.
With several passes (ppo), r drifts from 1 and the clip stops a token's push once
r leaves [1 - eps_low, 1 + eps_high] in the direction of its advantage.

Aggregation decides how long answers weigh:
    seq     mean over each sequence's tokens, then over sequences (GRPO): short answers'
            tokens weigh more.
    token   sum over all tokens / number of tokens (DAPO): every token weighs the same.
    dr_grpo sum over all tokens / (sequences x max_len) (Dr. GRPO): a constant
            normaliser, so no length bias at all.

Algorithms in the config map to these settings (ALGORITHMS below).
"""
from __future__ import annotations

import torch

from picorl.base_matmuls import trains_with_copies
from picorl.batching import left_pad, left_pad_ids, positions, repeat_cache_rows, repeat_rows
from picorl.head_logprobs import masked_logprobs, plain_head

# algorithm -> advantage scale, loss aggregation, default eps_high, dynamic sampling
ALGORITHMS = {
    "grpo": dict(scale="group", agg="seq", eps_high=0.2, dynamic_sampling=False),
    "dr_grpo": dict(scale="none", agg="dr_grpo", eps_high=0.2, dynamic_sampling=False),
    "dapo": dict(scale="group", agg="token", eps_high=0.28, dynamic_sampling=True),
    "reinforce": dict(scale="none", agg="seq", eps_high=0.2, dynamic_sampling=False),
    "ppo": dict(scale="group", agg="seq", eps_high=0.2, dynamic_sampling=False),
}
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group"):
    """Advantages of a flat reward vector laid out group by group.

    Returns (advantages, zero_var) where zero_var flags each group whose rewards are all equal.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    zero_var = (g.max(dim=1).values - g.min(dim=1).values) == 0
    if scale == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + STD_EPS)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    centred[zero_var] = 0.0
    return centred.view(-1), zero_var


def overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong penalty (Yu et al. 2025, section 3.4), added to the reward.

    0 up to max_tokens - buffer tokens, then falling linearly to -1 at max_tokens, where the
    engine cuts a completion off. With max_tokens 96 and buffer 16:
        length <= 80 -> 0;  88 -> -0.5;  96 (truncated) -> -1.
    A chain that loops until it is cut off then scores below a wrong answer that closes, and
    the push-down falls on the looping tokens. buffer 0 turns it off.
    """
    if buffer <= 0:
        return 0.0
    if buffer > max_tokens:
        raise ValueError(f"overlong buffer {buffer} is longer than max_tokens {max_tokens}")
    over = length - (max_tokens - buffer)
    return -min(max(over, 0), buffer) / buffer


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits go to float32 for the log-softmax over the vocabulary; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@trains_with_copies
def token_logprobs(model, input_ids, attention_mask, completion_mask, chunk: int = 0):
    """Log-probs of the completion tokens of a left-padded batch: returns (logp, mask), (batch, K).

    Left padding puts every completion at the right edge, so only the last K positions (K =
    longest completion) need logits: the prompt's logits over the whole vocabulary would be
    most of the memory and time, and no loss term uses them. chunk > 0: the completion
    positions go through the output head that many at a time and no (K x vocab) logits are
    held (picorl/head_logprobs.py); same values and gradients.
    """
    k = max(int(completion_mask.sum(1).max().item()), 1)
    mask = completion_mask[:, -k:]
    weight = plain_head(model) if chunk else None
    if weight is not None:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=positions(attention_mask)).last_hidden_state[:, -(k + 1):-1]
        return masked_logprobs(hidden, weight, input_ids[:, -k:], mask, chunk), mask
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   logits_to_keep=k + 1).logits[:, :-1]
    logp = torch.log_softmax(at_least_float32(logits), dim=-1).gather(-1, input_ids[:, -k:, None]).squeeze(-1)
    return logp * mask, mask


@trains_with_copies
def shared_prefix_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                           owner: list[int], pad_id: int, chunk: int = 0, scored: list[list[int]] | None = None):
    """Log-probs of completion tokens, running each prompt once for all of its completions.

    prompts: distinct prompt ids; completions[j] is sampled from prompts[owner[j]]. Returns
    (logp, mask), (len(completions), longest completion), completions right-padded.
    scored[j][t] = 0 leaves completion j's token t out of the mask (SFT: a user turn after a
    shared system prompt is read, not scored); through the chunked head it costs nothing.

    A group's k completions share one prompt, and at d6 the prompt (~165 tokens with the
    system prompt) is three times longer than a completion; running it k times is most of
    the forward and backward. So: one forward over the (left-padded) prompts keeps their
    keys/values, each row is repeated for its completions, and one forward over the
    completions attends to them. Gradients flow back through the cached keys/values into
    the prompt's forward, so loss and gradients equal token_logprobs' on the full
    sequences (tests/test_trainer.py checks both). chunk > 0: through the head a chunk of
    positions at a time, as token_logprobs.
    """
    device = next(model.parameters()).device
    weight = plain_head(model) if chunk else None
    run = model.get_decoder() if weight is not None else model  # hidden states, or logits
    p_ids, p_attn = (t.to(device) for t in left_pad_ids(prompts, pad_id))
    out = run(input_ids=p_ids, attention_mask=p_attn, position_ids=positions(p_attn), use_cache=True,
              **({} if weight is not None else {"logits_to_keep": 1}))
    rows = torch.tensor(owner, device=device)
    cache = repeat_cache_rows(out.past_key_values, owner)  # row j: completion j's prompt
    length = max(len(c) for c in completions)
    c_ids = torch.full((len(completions), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), length), dtype=torch.long)
    for j, c in enumerate(completions):
        c_ids[j, :len(c)], mask[j, :len(c)] = torch.tensor(c), 1
    c_ids, mask = c_ids.to(device), mask.to(device)
    c_positions = p_attn.sum(1)[rows][:, None] + torch.arange(length, device=device)
    # Right padding is safe here: a pad sits after every real token, so no real token sees it.
    c_out = run(input_ids=c_ids, attention_mask=torch.cat([p_attn[rows], mask], dim=1),
                position_ids=c_positions, past_key_values=cache, use_cache=True)
    if scored is not None:
        mask = mask * left_pad([list(s) + [0] * (length - len(s)) for s in scored], 0).to(device)
    if weight is not None:
        hidden = torch.cat([repeat_rows(out.last_hidden_state[:, -1:], owner), c_out.last_hidden_state[:, :-1]], dim=1)
        return masked_logprobs(hidden, weight, c_ids, mask, chunk), mask.float()
    # Token t is predicted by position t-1; the first by the prompt's last position.
    logits = torch.cat([repeat_rows(out.logits[:, -1:], owner), c_out.logits[:, :-1]], dim=1)
    logp = torch.log_softmax(at_least_float32(logits), dim=-1).gather(-1, c_ids[..., None]).squeeze(-1)
    mask = mask.float()
    return logp * mask, mask


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int | None = None):
    mask = mask.float()
    if agg == "seq":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if agg == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if agg == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    raise ValueError(f"agg must be 'seq', 'token' or 'dr_grpo', got {agg!r}")


def policy_loss(logp, old_logp, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.2,
                agg: str = "seq", max_len: int | None = None, return_metrics: bool = False):
    """Clipped-ratio policy loss -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A), aggregated by `agg`.

    logp, old_logp, mask: (batch, seq); advantages: (batch,) one per sequence.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, agg, max_len)
    if not return_metrics:
        return loss
    m = mask.bool()
    clip_frac = (clipped[m] < unclipped[m]).float().mean() if m.any() else torch.tensor(0.0)
    return loss, {"clip_frac": clip_frac.item(), "ratio_mean": ratio[m].mean().item() if m.any() else 1.0}


def kl_penalty(logp, ref_logp, mask, agg: str = "seq", max_len: int | None = None):
    """k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1, >= 0 per token."""
    d = ref_logp - logp
    return aggregate(torch.exp(d) - d - 1, mask, agg, max_len)
