"""SFT warmup: teach the answer format (and a way to work the task) before RL.

The demonstrations are the environment's (`Environment.demonstration`, in one of its
`demo_styles`; letter counting's are explained in picorl/envs/letter_counting.py). This
module tokenizes them behind the prompts exactly as the rollout engine tokenizes prompts,
batches them and runs the optimizer steps.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import torch
from tqdm.auto import tqdm

from picorl.base_matmuls import trains_with_copies
from picorl.batching import left_pad, left_pad_ids, positions
from picorl.data import messages_of
from picorl.distributed import all_sum, rank_and_world, sum_gradients
from picorl.envs import default_env
from picorl.grpo import at_least_float32, shared_prefix_logprobs


def demonstration(record: dict, style: str, tokenizer=None, env=None) -> str:
    """The assistant's target text for one record: the environment's (letter counting by default)."""
    return (env or default_env()).demonstration(record, style, tokenizer)


def encode_example(tokenizer, record: dict, style: str, env=None) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are -100 on the prompt so the loss covers the assistant's tokens only.

    The prompt is tokenized exactly as the rollout engine tokenizes it, and the target ends
    with eos, so SFT teaches the model to stop where generation stops.
    """
    return encode_records(tokenizer, [record], style, progress=False, env=env)[0]


ENCODE_CHUNK = 1024  # records per tokenizer call: big enough for the fast tokenizer to batch


def encode_records(tokenizer, records: list[dict], style: str,
                   progress: bool = True, env=None) -> list[tuple[list[int], list[int]]]:
    """Every record's (input_ids, labels), tokenized once, a chunk of records per tokenizer call.

    One call per chunk rather than per record halves the cost (0.35 against 0.69 ms a
    record on 2 CPU cores): the template is rendered per record, but the fast tokenizer
    cuts a whole list at once. Rendering the chat template and tokenizing the text gives
    the same ids as `chat_prompt_ids` (the template's own tokenize=True does exactly this).
    """
    out = []
    for lo in tqdm(range(0, len(records), ENCODE_CHUNK), desc="tokenizing demonstrations", unit="chunk",
                   disable=not progress or len(records) <= ENCODE_CHUNK):
        chunk = records[lo:lo + ENCODE_CHUNK]
        prompts = tokenizer.apply_chat_template([messages_of(r, env) for r in chunk], add_generation_prompt=True,
                                                tokenize=False)
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        targets = tokenizer([demonstration(r, style, tokenizer, env) for r in chunk],
                            add_special_tokens=False)["input_ids"]
        for prompt, target in zip(prompt_ids, targets):
            target = list(target) + [tokenizer.eos_token_id]
            out.append((list(prompt) + target, [-100] * len(prompt) + target))
    return out


class SFTBatches:
    """Which examples step s trains on, a function of (seed, step) alone: a run resumed at
    step s sees the batches an uninterrupted run would.

    Random (group_by_length=False): batch_size draws with replacement.

    By length: each epoch is a seeded shuffle of the examples, cut into windows of WINDOW
    batches; a window is sorted by length and cut into batches, and the epoch's batches are
    shuffled. A batch is padded to its longest row, so rows of like length waste little:
    cot demonstrations on d1-d6 run from about 60 to 330 tokens, and 32 random ones are 48%
    real tokens, 32 from a sorted window 98%. Every example is still seen once per epoch,
    and the window keeps the batches of one epoch different from the next's.
    """

    WINDOW = 64

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        if not lengths:
            raise ValueError("SFT needs at least one demonstration, got none")
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length = group_by_length
        self.per_epoch = max(1, len(lengths) // batch_size)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def __call__(self, step: int) -> list[int]:
        if not self.group_by_length:
            rng = random.Random(f"sft/{self.seed}/{step}")
            return [rng.randrange(len(self.lengths)) for _ in range(self.batch_size)]
        epoch, index = divmod(step, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._epoch_batches(epoch))
        return self._epoch[1][index]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"sft-by-length/{self.seed}/{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        need = self.per_epoch * self.batch_size  # fewer examples than a batch: cycle through them
        order = [order[i % len(order)] for i in range(need)]
        span = self.WINDOW * self.batch_size
        batches = []
        for lo in range(0, need, span):
            window = sorted(order[lo:lo + span], key=self.lengths.__getitem__)
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        rng.shuffle(batches)
        return batches


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Left-pad a batch, so that every target ends at the right edge (see sft_loss)."""
    ids, attn = left_pad_ids([x for x, _ in examples], pad_id)
    return ids, attn, left_pad([y for _, y in examples], -100)


@trains_with_copies
def sft_loss(model, ids, attn, labels, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the assistant tokens of a left-padded batch (mean or sum).

    Targets sit in the last K positions, so only those get logits: the prompt's logits over
    the whole vocabulary would cost most of the step and feed no loss term.
    """
    k = max(int((labels != -100).sum(1).max().item()), 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn),
                   logits_to_keep=k + 1).logits[:, :-1]
    logits = at_least_float32(logits)  # bf16 logits to float32 for the log-sum-exp; float64 stays float64
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels[:, -k:].reshape(-1), ignore_index=-100, reduction=reduction)


# Positions per pass through the output head when the shared prefix runs once: a chunk's
# logits are 512 x 49,152 floats (100 MB) for SmolLM2, and only demonstration tokens go through.
HEAD_CHUNK = 512


def shared_prefix_length(batch: list[tuple[list[int], list[int]]]) -> int:
    """How many leading tokens every row of `batch` shares, none of them a target, leaving each
    row at least one token of its own.

    Chat demonstrations all open with the same system prompt: letter counting's is 40 of a d3
    row's ~135 tokens, read eight times a batch of 8 when once would do.
    """
    rows = [ids for ids, _ in batch]
    first_target = min(next((i for i, y in enumerate(labels) if y != -100), len(labels)) for _, labels in batch)
    limit = min(min(len(r) for r in rows) - 1, first_target)
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def shared_prefix_sft_loss(model, batch: list[tuple[list[int], list[int]]], pad_id: int, prefix: int) -> torch.Tensor:
    """The summed next-token loss over `batch`'s targets, with its first `prefix` tokens run once.

    The shared tokens go through the model as one row whose keys and values every row then
    attends to (grpo.shared_prefix_logprobs, as GRPO runs a group's prompt once); gradients
    flow back through those keys and values, so loss and gradients equal sft_loss's
    (tests/test_sft.py checks both). Worked example, a batch of 8 d3 rows of ~135 tokens
    with a 40-token system prompt: 8 x 95 + 40 = 800 tokens through the model against 1,080.
    """
    rests = [ids[prefix:] for ids, _ in batch]
    scored = [[int(y != -100) for y in labels[prefix:]] for _, labels in batch]
    logp, mask = shared_prefix_logprobs(model, [batch[0][0][:prefix]], rests, [0] * len(batch), pad_id,
                                        chunk=HEAD_CHUNK, scored=scored)
    return -(logp * mask).sum()


def batch_gradients(model, params: list[torch.nn.Parameter], batch: list[tuple[list[int], list[int]]],
                    pad_id: int, shared_prefix: bool = True) -> float:
    """Gradients of one step's mean loss over `batch`; returns that loss.

    Data parallel (picorl/distributed.py), each rank takes rows rank::world and divides its
    summed loss by the demonstration tokens of the whole batch, so the gradients summed over
    ranks are the one-process gradient of the batch's mean:

        batch of 4 rows with 30, 10, 20, 40 target tokens on 2 ranks: rank 0 has rows 0 and 2
        (50 tokens), rank 1 rows 1 and 3 (50); each divides its sum by 100.
    """
    rank, world = rank_and_world()
    mine = batch[rank::world]
    loss_sum, tokens = torch.zeros(()), 0  # a rank with no rows adds nothing
    prefix = shared_prefix_length(mine) if mine and shared_prefix and len(mine) > 1 else 0
    if prefix:
        tokens = sum(y != -100 for _, labels in mine for y in labels)
        loss_sum = shared_prefix_sft_loss(model, mine, pad_id, prefix)
    elif mine:
        device = next(model.parameters()).device
        ids, attn, labels = (t.to(device) for t in collate(mine, pad_id))
        tokens = int((labels != -100).sum())
        loss_sum = sft_loss(model, ids, attn, labels, reduction="sum")
    (total,) = all_sum([tokens])
    if mine:
        (loss_sum / total).backward()
    sum_gradients(params)
    return all_sum([loss_sum.item()])[0] / total


def sft_step(model, params, optimizer, batch: list[tuple[list[int], list[int]]],
             pad_id: int, shared_prefix: bool = True) -> tuple[float, float, bool]:
    """One optimizer step on `batch`, unless its loss or gradient norm is not finite.

    Returns (loss, gradient norm before clipping, whether the step was taken).
    """
    optimizer.zero_grad(set_to_none=True)
    loss_val = batch_gradients(model, params, batch, pad_id, shared_prefix)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()  # every rank clips the same sum
    finite = math.isfinite(loss_val) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    return loss_val, grad_norm, finite


SCHEDULES = ("constant", "cosine", "linear")


def sft_lr(step: int, steps: int, lr: float, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of SFT step `step` (0-based) of `steps`: a function of the step alone, so
    a run resumed at step s sets exactly the rate an uninterrupted run would.

    Linear warmup over the first `warmup_steps`, then constant, or decaying towards 0 by the last
    step (cosine or linear). Worked example, steps=100, lr=1e-3, no warmup, cosine:
        step 0 -> 1e-3, step 50 -> 5e-4, step 99 -> 2.5e-7
    Why decay: the last steps then take small steps in a minimum the large ones found, and the
    greedy chain has to be right at every one of ~160 tokens, so a lower final loss could
    matter. At 200 x 8 on a CPU it lowered the final loss but not the d3 score (docs/cot-sft.md).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"sft.lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(steps - warmup_steps, 1)  # 0 at the first step, < 1 at the last
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)


class NonFiniteSteps(FloatingPointError):
    """SFT stopped: too many steps in a row had a non-finite loss or gradient norm."""


def train_sft(model, tokenizer, records: list[dict], *, style: str, steps: int, batch_size: int,
              lr: float, lr_schedule: str = "constant", warmup_steps: int = 0, seed: int = 0,
              group_by_length: bool = False, compile_forward: bool = False, shared_prefix: bool = True,
              optimizer=None, start_step: int = 0,
              max_skips_in_a_row: int = 5, on_step: Callable[[int, float], None] | None = None,
              progress: bool = True, env=None) -> list[dict]:
    """Run SFT steps [start_step, steps) on `env`'s demonstrations (letter counting's when left out); returns each step's {sft/loss, sft/grad_norm, sft/lr, sft/skipped}.

    The demonstrations are tokenized once, up front; `SFTBatches` picks step s's batch from
    (seed, step), so step s sees the same batch whether the run went straight through or
    resumed at s.

    A step whose loss or gradient norm is not finite changes nothing: clipping an infinite
    norm multiplies every gradient by 1/inf = 0, and inf x 0 is NaN, so one such step would
    turn every weight into NaN (a bf16 run on a GPU did exactly that at step 294 of 400 and
    answered nothing afterwards). It is logged as skipped; `max_skips_in_a_row` of them
    raise NonFiniteSteps.

    shared_prefix: each batch's common opening (the system prompt) runs once and every row
    attends to its keys and values (shared_prefix_sft_loss): the same loss and gradients
    with fewer tokens. Off under compile_forward, whose compiled module the two-part forward
    would go around.

    compile_forward: the forward runs through torch.compile (Inductor, dynamic shapes, so
    batches of any length share one compile). Eager, a bf16 forward and backward of the 135M
    model with LoRA calls 13,300 operators whatever the batch: 1,670 matmuls, 1,290 dtype casts
    between the bf16 base and the float32 adapter, 2,500 other element-wise kernels, the rest
    views. Fused, there are far fewer kernels to launch. The weights are the model's own, so
    whatever trains or samples next sees them; the compile is paid at the first step.
    """
    if steps <= start_step:
        return []
    sft_lr(0, steps, lr, lr_schedule, warmup_steps)  # a bad schedule name fails before the tokenizing
    examples = encode_records(tokenizer, records, style, progress=progress, env=env)
    batches = SFTBatches([len(ids) for ids, _ in examples], batch_size, seed, group_by_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    forward = torch.compile(model, dynamic=True) if compile_forward else model
    model.train()
    log, in_a_row = [], 0
    for step in tqdm(range(start_step, steps), desc="sft", unit="step", disable=not progress):
        rate = sft_lr(step, steps, lr, lr_schedule, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss_val, grad_norm, finite = sft_step(forward, params, optimizer, [examples[i] for i in batches(step)],
                                               tokenizer.pad_token_id, shared_prefix and not compile_forward)
        in_a_row = 0 if finite else in_a_row + 1
        log.append({"sft/loss": loss_val, "sft/grad_norm": grad_norm, "sft/lr": rate, "sft/skipped": float(not finite)})
        if on_step is not None:
            on_step(step + 1, loss_val)
        if in_a_row >= max_skips_in_a_row:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteSteps(f"SFT: {in_a_row} steps in a row had a non-finite loss or gradient norm "
                                 f"(last at step {step + 1}, loss {loss_val}, gradient norm {grad_norm})")
    optimizer.zero_grad(set_to_none=True)  # leave no gradients behind for whatever trains next
    model.eval()
    return log
