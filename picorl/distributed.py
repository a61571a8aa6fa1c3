"""Data parallelism over torch.distributed: whole groups per rank, gradients summed.

Launched by `torchrun --nproc-per-node N ...` (which sets RANK, WORLD_SIZE, MASTER_ADDR);
one process is world size 1 and every function here is then a no-op, so the single-process
path runs exactly as before.

How one update splits over N ranks. Every rank draws the same tasks for the update (the
draw depends only on run seed and update number) and takes tasks[rank::N]; a task's k
samples stay on one rank, so its group advantages need no communication. Each micro-batch's
loss is weighted by the global batch (sequences or tokens summed over ranks), so the
gradients summed over ranks are the single-process gradient of the whole batch:

    2 ranks, 8 tasks x k 8, token aggregation: rank 0 holds tasks 0, 2, 4, 6 (32 sequences,
    say 3,100 tokens), rank 1 the others (3,300 tokens); each micro-batch weighs its tokens /
    6,400, and all_reduce(SUM) of the gradients gives the gradient of the mean over 6,400.

Every rank then clips the same summed gradient and takes the same optimizer step, so the
weights stay equal without being broadcast. SFT splits a step's batch the same way, by rows
(`picorl.sft.batch_gradients`).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPUs); (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank_and_world()


def barrier() -> None:
    """Wait for every rank (after rank 0 wrote a checkpoint the others will read)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks of a few numbers (one collective call)."""
    if rank_and_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order (small Python objects)."""
    rank, world = rank_and_world()
    if world == 1:
        return list(items)
    out: list = [None] * world
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over ranks, in one flat buffer (one collective call)."""
    if rank_and_world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
