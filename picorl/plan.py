"""The static plan of a run: which updates each GRPO chunk does and when evals happen.

Stage budgets are update counts, so the plan is known before any work: `picorl train
--dry-run` prints it, and the flow walks it. Chunks end at every eval point, every stage
boundary and every `run.chunk_updates` updates; each chunk ends with a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from picorl.curriculum import Curriculum


@dataclass(frozen=True)
class Chunk:
    stage: int      # index into cfg.stages
    start: int      # global update number before the chunk
    end: int        # global update number after it
    eval_after: bool


def stage_names(cfg) -> list[str]:
    """MLflow child-run names: grpo-d<start difficulty>, with -2, -3 for repeats."""
    names, seen = [], {}
    for s in cfg.stages:
        base = f"grpo-d{s.difficulty}"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def chunks(cfg) -> list[Chunk]:
    out, step = [], 0
    for i, stage in enumerate(cfg.stages):
        stage_end = step + stage.updates
        while step < stage_end:
            nxt_eval = (step // cfg.eval.every + 1) * cfg.eval.every
            end = min(stage_end, step + cfg.run.chunk_updates, nxt_eval)
            out.append(Chunk(i, step, end, eval_after=(end % cfg.eval.every == 0) or end == stage_end))
            step = end
    return out


def eval_steps(cfg) -> list[int]:
    """Update numbers after which a greedy eval runs (0 = after SFT)."""
    return [0] + [c.end for c in chunks(cfg) if c.eval_after]


def train_difficulties(cfg) -> list[int]:
    ds = set(cfg.sft.difficulties) if cfg.sft.enabled else set()
    for s in cfg.stages:
        ds.update(Curriculum.for_stage(s).reachable())
    return sorted(ds)


def describe_plan(cfg) -> str:
    total = sum(s.updates for s in cfg.stages)
    per_update = cfg.grpo.tasks_per_update * (cfg.grpo.group_size + cfg.grpo.greedy_member)
    evals = eval_steps(cfg)
    lines = [f"task       {cfg.env.name}" + (f" {cfg.env.options}" if cfg.env.options else ""),
             f"model      {cfg.model.name} (LoRA r{cfg.model.lora.rank}/a{cfg.model.lora.alpha})"
             if cfg.model.lora.enabled else f"model      {cfg.model.name} (full fine-tuning)",
             f"engine     {cfg.rollout.engine}, max_tokens {cfg.rollout.max_tokens}, temperature {cfg.rollout.temperature}",
             f"sft        {cfg.sft.steps} steps x {cfg.sft.batch_size} ({cfg.sft.style}) on d{cfg.sft.difficulties}"
             if cfg.sft.enabled else "sft        off",
             f"algorithm  {cfg.grpo.algorithm}, reward {cfg.reward.kind}, {cfg.grpo.tasks_per_update} tasks x k {cfg.grpo.group_size}"
             + (" + the greedy answer" if cfg.grpo.greedy_member else "")]
    for name, s in zip(stage_names(cfg), cfg.stages):
        rule = (f"promote at {s.promote_at}" if s.promote_at is not None else "fixed") + \
               (f", demote below {s.demote_below}" if s.demote_below is not None else "")
        lines.append(f"stage      {name}: {s.updates} updates from d{s.difficulty} ({rule}, window {s.window})")
    lines += [f"updates    {total} in {len(chunks(cfg))} chunks of <= {cfg.run.chunk_updates}",
              f"evals      {len(evals)} greedy evals at updates {evals} on d{cfg.eval.difficulties} x {cfg.eval.size}",
              f"rollouts   {total * per_update} training completions (+ dapo resampling), "
              f"{len(evals) * cfg.eval.size * len(cfg.eval.difficulties)} eval completions"]
    return "\n".join(lines)
