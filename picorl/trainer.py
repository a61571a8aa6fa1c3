"""One GRPO update, end to end: rollouts -> rewards -> advantages -> loss -> optimizer step.

    trainer = GRPOTrainer(model, tokenizer, engine, cfg)
    metrics = trainer.update(train_records)      # one update on tasks drawn from the records

Every update draws its tasks and sampling seed from (run seed, update number), so update N
is the same update whether the run went straight through or resumed from a checkpoint.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from picorl.batching import distinct_rows, pad_batch
from picorl.checkpoint import load_model_weights, load_trained_weights, trained_weights
from picorl.data import messages_of
from picorl.distributed import all_sum, gather, rank_and_world, sum_gradients
from picorl.envs import env_of
from picorl.envs.base import Environment, reward_of_grade
from picorl.faults import fault_point
from picorl.grpo import (ALGORITHMS, group_advantages, kl_penalty, overlong_penalty, policy_loss,
                         shared_prefix_logprobs, token_logprobs)
from picorl.rollout import Completion, Sampling, samples_and_greedy
from picorl.sft import sft_lr

# (reward, fully correct, formatted) of one completion on its record.
RewardFn = Callable[[Completion, dict], tuple[float, bool, bool]]


class Scored(NamedTuple):
    """One completion as the update sees it: its reward (overlong penalty included) and what
    the diagnostics need, so a loop taking over shows in the metrics before the eval."""
    reward: float
    correct: bool
    formatted: bool
    length: int      # generated tokens
    truncated: bool  # stopped by max_tokens, not by its own end


def env_reward(env: Environment, kind: str, format_bonus: float) -> RewardFn:
    """(reward, fully correct, formatted) of a completion on one of `env`'s records, graded once."""
    def reward(c: Completion, r: dict) -> tuple[float, bool, bool]:
        g = env.grade(c.text, r)
        return reward_of_grade(g, kind, format_bonus), g.exact, g.formatted
    return reward


def rollout_diagnostics(scored: list[Scored]) -> dict:
    """Fractions truncated and formatted, and mean lengths of right and of wrong completions.

    Worked example: lengths [20, 96, 96, 30], right [T, F, F, F], max_tokens 96 (two hit it):
    frac_truncated 0.5, len_right 20, len_wrong 74; a chain that loops until max_tokens drags
    len_wrong towards max_tokens and frac_truncated up while the greedy eval has not moved yet.
    A mean over no completion (no right answer in the batch) is left out, not reported as 0.
    """
    n = max(len(scored), 1)
    out = {"frac_truncated": sum(s.truncated for s in scored) / n,
           "frac_formatted": sum(s.formatted for s in scored) / n}
    for name, want in (("len_right", True), ("len_wrong", False)):
        lengths = [s.length for s in scored if s.correct == want]
        if lengths:
            out[name] = sum(lengths) / len(lengths)
    return out


@dataclass
class Rollouts:
    """What `collect` gathered for one update."""
    tasks: list[dict]                          # the records kept (one per group)
    groups: list[list[Completion]]             # their k completions each
    scored: list[list[tuple[float, bool]]]     # (reward, fully correct) per completion
    first_round: list[tuple[float, bool]]      # every completion of the first round, for metrics
    rollout_s: float                           # seconds in the engine, scoring excluded
    stats: dict                                # groups and tokens rolled out, seconds scoring


def _tokens(groups) -> int:
    return sum(len(c.token_ids) for grp in groups for c in grp)


class GRPOTrainer:
    def __init__(self, model, tokenizer, engine, cfg, reward_fn: RewardFn | None = None):
        self.model, self.tokenizer, self.engine, self.cfg = model, tokenizer, engine, cfg
        g = cfg.grpo
        self.algo = dict(ALGORITHMS[g.algorithm])
        self.eps_high = g.eps_high if g.eps_high is not None else self.algo["eps_high"]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=g.lr, weight_decay=g.weight_decay)
        # SFT's warmup-then-decay shape as a factor of grpo.lr, over every stage's updates: a
        # function of the update number alone, so a resumed run sets the rate an unbroken one would.
        # Held at the last update's rate past the budget (a decay must not turn back up or below 0).
        last = max(sum(s.updates for s in cfg.stages) - 1, 0)
        warm, schedule = max(g.warmup_updates, 0), g.lr_schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: sft_lr(min(s, last), last + 1, 1.0, schedule, warm))
        self.env = env_of(cfg)
        self.reward_fn = reward_fn or env_reward(self.env, cfg.reward.kind, cfg.reward.format_bonus)
        self.step = 0  # global update number: updates done so far
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.device = next(model.parameters()).device
        # A group's members: its k samples, then (grpo.greedy_member) the task's greedy answer.
        self.members = g.group_size + int(g.greedy_member)
        # The KL term's reference: by default the trained weights as GRPO finds them (the SFT
        # policy), kept as a copy of the trainable tensors (a LoRA adapter: a few MB) and
        # swapped in for the reference's forward. A resumed run must not take its resume
        # point as the reference: the pipeline sets it from step_0 (`reference_from`).
        # kl_reference=base is the model with the adapter off instead: the model before SFT,
        # which cannot answer in the format SFT taught, so the KL pulls towards unlearning it.
        self.reference: dict[str, torch.Tensor] | None = None
        self.reference_folder: str | None = None  # the checkpoint `reference` was read from
        if g.kl_coef > 0 and g.kl_reference == "start":
            self.reference = trained_weights(self.model)

    # ------------------------------------------------------------ rollouts and rewards

    def _rollout(self, records, seed):
        """(groups, scored groups, seconds spent scoring) for one engine call."""
        r = self.cfg.rollout
        sampling = Sampling(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=seed)
        prompts = [messages_of(x, self.env) for x in records]
        if self.cfg.grpo.greedy_member:
            groups = samples_and_greedy(self.engine, prompts, self.cfg.grpo.group_size, sampling)
        else:
            groups = self.engine.generate(prompts, self.cfg.grpo.group_size, sampling)
        t0 = time.perf_counter()
        scored = [[self.score(c, rec) for c in grp] for grp, rec in zip(groups, records)]
        return groups, scored, time.perf_counter() - t0

    def score(self, c: Completion, record: dict) -> Scored:
        """The reward function's verdict, plus DAPO's soft overlong penalty when reward.overlong_buffer > 0."""
        reward, correct, formatted = self.reward_fn(c, record)
        n = len(c.token_ids)
        reward += overlong_penalty(n, self.cfg.rollout.max_tokens, self.cfg.reward.overlong_buffer)
        return Scored(float(reward), bool(correct), bool(formatted), n, not c.finished)

    def collect(self, records: list[dict]) -> Rollouts:
        """Sample tasks and roll them out; with dynamic sampling, refill zero-variance groups."""
        g, cfg = self.cfg.grpo, self.cfg
        rank, world = rank_and_world()
        rng = random.Random(f"tasks/{cfg.run.seed}/{self.step}")
        tasks = [rng.choice(records) for _ in range(g.tasks_per_update)][rank::world]  # whole groups per rank
        quota = len(tasks)
        if world > 1:  # refills and samples differ per rank; one process keeps its old draws
            rng = random.Random(f"tasks/{cfg.run.seed}/{self.step}/rank{rank}")
        seed = cfg.run.seed * 1_000_003 + self.step + rank * 104_729
        t0 = time.perf_counter()
        groups, scored, reward_s = self._rollout(tasks, seed=seed)
        fault_point("rollout", self.step + 1)
        stats = {"rollout_groups": len(groups), "rollout_tokens": _tokens(groups)}
        all_rewards = [s for grp in scored for s in grp]
        if self.algo["dynamic_sampling"]:
            keep = lambda s: len({x[0] for x in s}) > 1  # noqa: E731
            kept = [(t, gr, s) for t, gr, s in zip(tasks, groups, scored) if keep(s)]
            for round_ in range(g.max_resample_rounds):
                if len(kept) >= quota:
                    break
                more = [rng.choice(records) for _ in range(quota - len(kept))]
                mg, ms, more_reward_s = self._rollout(more, seed=seed + (round_ + 1) * 7919)
                reward_s += more_reward_s
                stats["rollout_groups"] += len(mg)
                stats["rollout_tokens"] += _tokens(mg)
                all_rewards += [s for grp in ms for s in grp]
                kept += [(t, gr, s) for t, gr, s in zip(more, mg, ms) if keep(s)]
            kept = kept[:quota]
            tasks, groups, scored = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
        stats["reward_s"] = reward_s
        first_round = gather(all_rewards[:quota * self.members])  # every rank's, for the metrics
        return Rollouts(tasks, groups, scored, first_round, time.perf_counter() - t0 - reward_s, stats)

    # ------------------------------------------------------------ the update

    def update(self, records: list[dict]) -> dict:
        """One policy update on tasks drawn from `records`; returns its metrics."""
        g = self.cfg.grpo
        t_start = time.perf_counter()
        got = self.collect(records)
        groups, scored, first_round, rollout_s, stats = got.groups, got.scored, got.first_round, got.rollout_s, got.stats
        # Zero variance is over a group's members (what the advantages see); the other
        # figures are over its k samples, comparable with a run that has no greedy member.
        _, zero_var_first = group_advantages(torch.tensor([s.reward for s in first_round]), self.members,
                                             scale="none")
        greedy_first = first_round[g.group_size::self.members] if g.greedy_member else []
        first_round = [s for i, s in enumerate(first_round) if i % self.members < g.group_size]
        rewards_first = torch.tensor([s.reward for s in first_round], dtype=torch.float)
        metrics = {
            "reward_mean": rewards_first.mean().item(),
            "reward_std": rewards_first.std().item() if rewards_first.numel() > 1 else 0.0,
            "frac_correct": sum(s.correct for s in first_round) / len(first_round),
            **rollout_diagnostics(first_round),
            **({"greedy_correct": sum(s.correct for s in greedy_first) / len(greedy_first)} if greedy_first else {}),
            "reward_std_in_group": rewards_first.view(-1, g.group_size).std(dim=1).mean().item(),
            "frac_zero_var_groups": zero_var_first.float().mean().item(),
            "completion_len": _tokens(groups) / max(1, sum(len(grp) for grp in groups)),
            "rollout_tokens_per_s": stats["rollout_tokens"] / max(rollout_s, 1e-9),
            "rollout_s": rollout_s,
            **stats,
        }
        # Per-task fraction correct over the first round, for the curriculum's rolling window.
        metrics["task_correct"] = [sum(s.correct for s in first_round[i:i + g.group_size]) / g.group_size
                                   for i in range(0, len(first_round), g.group_size)]
        if all_sum([len(groups)])[0] == 0:  # on no rank: every rank skips alike
            return self._finish(metrics, t_start, loss=0.0, kl=0.0, grad_norm=0.0, skipped=True,
                                reason="no group with reward variance")
        rewards = torch.tensor([x.reward for s in scored for x in s], dtype=torch.float)
        adv, _ = group_advantages(rewards, self.members, scale=self.algo["scale"])
        completions = [c for grp in groups for c in grp]
        group_of = [i for i, grp in enumerate(groups) for _ in grp]
        # DAPO's overlong filter: a truncated completion keeps its place in its group's
        # advantages but carries no loss, so a chain cut off mid-way is neither pushed up nor down.
        carries_loss = [not (g.overlong_filter and x.truncated) for s in scored for x in s]
        metrics["frac_filtered"] = carries_loss.count(False) / max(len(carries_loss), 1)
        # Gradients accumulate across micro-batches, so they must start from nothing: stale
        # ones (from SFT, or an update interrupted mid-backward) would leak into this step.
        self.optimizer.zero_grad(set_to_none=True)
        t_loss = time.perf_counter()
        loss_val, kl_val, clip = self._optimise(completions, group_of, adv, carries_loss)
        sum_gradients(self.params)  # data parallel: the whole batch's gradient on every rank
        t_opt = time.perf_counter()
        metrics["loss_backward_s"] = t_opt - t_loss
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, g.max_grad_norm).item()
        finite = math.isfinite(loss_val) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["optimizer_s"] = time.perf_counter() - t_opt
        t_sync = time.perf_counter()
        if finite:
            self.engine.sync_weights(self.model)  # the next rollouts sample from the updated policy
        metrics["sync_s"] = time.perf_counter() - t_sync
        metrics["clip_frac"] = clip
        return self._finish(metrics, t_start, loss=loss_val, kl=kl_val, grad_norm=grad_norm,
                            skipped=not finite, reason="non-finite loss or grad norm")

    def _finish(self, metrics, t_start, *, loss, kl, grad_norm, skipped, reason):
        self.scheduler.step()
        self.step += 1
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.skipped_total += int(skipped)
        metrics.update(loss=loss, kl=kl, grad_norm=grad_norm, skipped=float(skipped),
                       skipped_updates=float(self.skipped_total),
                       lr=self.optimizer.param_groups[0]["lr"], update_s=time.perf_counter() - t_start)
        if skipped:
            metrics["skip_reason"] = reason
        return metrics

    def _logprobs(self, model, completions, group_of, part):
        """(logp, mask) of the completions in `part`, one row each."""
        pad = self.tokenizer.pad_token_id
        if self.cfg.grpo.shared_prefix:
            rows, owner = distinct_rows([group_of[i] for i in part])  # one prompt per group
            return shared_prefix_logprobs(model, [completions[part[r]].prompt_ids for r in rows],
                                          [completions[i].token_ids for i in part], owner, pad,
                                          chunk=self.cfg.grpo.logprob_chunk)
        seqs = [completions[i].prompt_ids + completions[i].token_ids for i in part]
        masks = [[0] * len(completions[i].prompt_ids) + [1] * len(completions[i].token_ids) for i in part]
        return token_logprobs(model, *pad_batch(seqs, masks, pad, self.device), chunk=self.cfg.grpo.logprob_chunk)

    def _optimise(self, completions, group_of, adv, carries_loss=None):
        """Loss and gradients over micro-batches, weighted so they sum to the full batch's loss.

        carries_loss[i] False (the overlong filter) leaves completion i out of the loss and of
        the batch it is averaged over, as if it had not been sampled."""
        g = self.cfg.grpo
        agg, mb = self.algo["agg"], g.micro_batch_size
        max_len = self.cfg.rollout.max_tokens
        kept = [i for i in range(len(completions)) if carries_loss is None or carries_loss[i]]
        # Weights are shares of the whole batch, over every rank (picorl/distributed.py).
        n_all, total_tokens = (int(x) for x in all_sum([len(kept), sum(len(completions[i].token_ids) for i in kept)]))
        # Zero-advantage sequences add nothing to the policy loss; without a KL term, skip their forward.
        idx = [i for i in kept if g.kl_coef > 0 or adv[i] != 0]
        parts = [idx[s:s + mb] for s in range(0, len(idx), mb)]
        old = {}
        if g.epochs > 1:  # the ratio needs the pre-update policy's log-probs, frozen
            with torch.no_grad():
                for part in parts:
                    lp, m = self._logprobs(self.model, completions, group_of, part)
                    for j, i in enumerate(part):
                        old[i] = lp[j][m[j].bool()]
        ref = self._ref_logprobs(completions, group_of, parts) if g.kl_coef > 0 else {}
        loss_sum = kl_sum = clip_sum = 0.0
        n_mb = 0
        self.model.train()
        for _ in range(g.epochs):
            for j, part in enumerate(parts):
                logp, cm = self._logprobs(self.model, completions, group_of, part)
                if old:
                    old_lp = torch.zeros_like(logp)
                    for j, i in enumerate(part):
                        old_lp[j][cm[j].bool()] = old[i]
                else:
                    old_lp = logp.detach()
                weight = (cm.sum().item() / max(total_tokens, 1)) if agg == "token" else len(part) / n_all
                a = adv[part].to(self.device)
                loss, m = policy_loss(logp, old_lp, a, cm, eps_low=g.eps_low, eps_high=self.eps_high,
                                      agg=agg, max_len=max_len, return_metrics=True)
                total = loss
                if g.kl_coef > 0:
                    kl = kl_penalty(logp, ref[j], cm, agg, max_len)
                    total = total + g.kl_coef * kl
                    kl_sum += kl.item() * weight
                (total * weight / g.epochs).backward()
                loss_sum += loss.item() * weight / g.epochs
                clip_sum += m["clip_frac"]
                n_mb += 1
        self.model.eval()
        loss_sum, kl_sum, clip_sum, n_mb = all_sum([loss_sum, kl_sum, clip_sum, n_mb])
        return loss_sum, kl_sum / g.epochs, clip_sum / max(n_mb, 1)

    @torch.no_grad()
    def _ref_logprobs(self, completions, group_of, parts) -> dict[int, torch.Tensor]:
        """The reference policy's log-probs of each micro-batch in `parts`, by its index.

        Computed before any forward that builds a graph: swapping the reference weights in
        while a graph holds the trained ones would corrupt its backward."""
        self.model.eval()  # as the policy's own forward would be without dropout: no noise in the target
        if self.reference is None:  # kl_reference=base
            with self.model.disable_adapter():
                return {j: self._logprobs(self.model, completions, group_of, part)[0] for j, part in enumerate(parts)}
        now = trained_weights(self.model)
        load_trained_weights(self.model, self.reference)
        try:
            return {j: self._logprobs(self.model, completions, group_of, part)[0] for j, part in enumerate(parts)}
        finally:
            load_trained_weights(self.model, now)

    def reference_from(self, folder) -> None:
        """Take the KL reference from checkpoint `folder` (step_0: the policy GRPO started
        from), whatever the model holds now (a resumed run holds a later step). Read once: every
        GRPO chunk asks for the same step_0, and a full fine-tune's is the whole model."""
        if self.cfg.grpo.kl_coef <= 0 or self.cfg.grpo.kl_reference != "start" or self.reference_folder == str(folder):
            return
        now = trained_weights(self.model)
        load_model_weights(self.model, Path(folder))
        self.reference, self.reference_folder = trained_weights(self.model), str(folder)
        load_trained_weights(self.model, now)

    # ------------------------------------------------------------ state for checkpoints

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_in_a_row": self.skipped_in_a_row, "skipped_total": self.skipped_total,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
