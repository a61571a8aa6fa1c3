"""Which GRPO recipe makes the model better? Arms from one SFT start, compared item by item.

    python -m bench.rl_recipe --config configs/default.yaml --arms binary partial overlong_filter
    python -m bench.rl_recipe --config configs/default.yaml --arms more_sft      # GRPO's minutes spent on SFT
    python -m bench.rl_recipe --arms greedy_member --start-adapter results/RUN/sft_adapter  # from a run's SFT

One SFT (the config's, from its seeded adapter) is the start of every arm. Each GRPO arm
restores that adapter, takes a fresh optimizer and runs the config's stages with its own
overrides (`ARMS`); `more_sft` spends the median GRPO arm's seconds on more SFT steps of
the same run instead (same optimizer, batches drawn as the longer SFT would draw them), the
honest reference for whether RL is the better use of the time. Its step count is those
seconds at the pace of its own first steps, timed in this process (a start made in another
process or session stepped at that one's speed); `--more-sft-steps N` gives the count
instead (the row records the seconds it took). `--start-adapter DIR` starts the arms from a
saved adapter instead of SFT (an exported run's sft_adapter: its arms then compare with that
run's own GRPO, from the same weights on the same held-out items); `--start-sft-steps N` goes
on with that run's SFT for N more steps first (a longer SFT of the same run, without
repeating the steps it took).

Every arm is measured on the same held-out items as its start: greedy exact (the eval
the pipeline reports), and sampled accuracy and pass@k at the rollout temperature, since
RL first sharpens the samples towards the greedy answer and the greedy eval moves only
where samples beat it. The items gained and lost against the start and the sign test's p
say whether a change is more than the 128-item noise. Per-update diagnostics (truncated,
formatted, lengths of right and wrong completions) are kept per arm. For letter counting
each arm is also read off its `cot` chains (`chain_figures`): an exact answer is right by
counting only when the chain's own tally is right and the answer says it, so a gain from a
constant answer shows as exact up, counted flat or down.

The result, bench/results/rl_recipe-<machine>-<config>.json, is written after every arm,
so an interrupted run keeps what it finished; rerunning redoes only the arms asked for.
Each arm's end weights are kept beside the start (`<start-dir>/<key>/arms/<result>-<arm>.pt`).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, earlier_rows, machine, machine_tag, write_result
from picorl import data
from picorl.checkpoint import load_adapter_file, load_trained_weights, trained_weights
from picorl.config import ConfigError, LoraConfig, load_config, to_dict
from picorl.curriculum import Curriculum
from picorl.envs import env_of
from picorl.envs.letter_counting import LetterCounting, chain_counts, spelling_reward
from picorl.files import atomic_write_text
from picorl.evaluate import SAMPLED, evaluate_records, paired_change, sample_records, sampled_figures
from picorl.evaluate import sampled_change as evaluate_sampled_change
from picorl.models import load_for_config
from picorl.session import engine_for_config, eval_engine
from picorl.sft import train_sft
from picorl.trainer import GRPOTrainer

# arm -> (what it changes, --set overrides over the base config)
ARMS = {
    "binary": ("the base config's reward", ["reward.kind=binary"]),
    "partial": ("reward partial (0 / 0.1 + 0.9 x fraction right): the control", ["reward.kind=partial"]),
    "format_bonus": ("binary + 0.1 for a formatted answer: formatted wrong beats unformatted",
                     ["reward.kind=binary", "reward.format_bonus=0.1"]),
    "overlong_filter": ("binary, truncated completions carry no loss", ["reward.kind=binary", "grpo.overlong_filter=true"]),
    "overlong_penalty": ("binary, soft overlong penalty over the last 32 tokens",
                         ["reward.kind=binary", "reward.overlong_buffer=32"]),
    # Letter counting's constant answer (every asked letter once) is right on 36% of tier-3
    # items, 18% at tier 4 and 5% at tier 5: trained where it pays less, GRPO cannot climb by it.
    "train_d4": ("binary, trained at tier 4 (the constant answer right on 18%)",
                 ["reward.kind=binary", "stages=[{difficulty: 4, updates: 30}]"]),
    "train_d5": ("binary, trained at tier 5 (the constant answer right on 5%)",
                 ["reward.kind=binary", "stages=[{difficulty: 5, updates: 30}]"]),
    "low_lr": ("binary at a sixth of the learning rate (5e-5): from a start that counts, smaller steps",
               ["reward.kind=binary", "grpo.lr=5e-5"]),
    "mid_lr": ("binary at a third of the learning rate (1e-4): between the rate that drifts and the one that holds",
               ["reward.kind=binary", "grpo.lr=1e-4"]),
    # Four times the samples an update sees (16 tasks x 8, as configs/gpu.yaml draws): the
    # advantage of a group of 8 is a finer estimate, and 16 tasks average more items per step.
    "low_lr_wide": ("binary at 5e-5 with 16 tasks x 8 samples an update: the small step, less noise",
                    ["reward.kind=binary", "grpo.lr=5e-5", "grpo.tasks_per_update=16", "grpo.group_size=8"]),
    # The k3 KL to the policy GRPO starts from (the SFT adapter, grpo.kl_reference=start):
    # every sample, zero-variance groups included, is pulled back towards SFT's distribution,
    # against the collapse of all samples onto one constant answer.
    "greedy_member": ("binary at 1e-4, each task's greedy answer a member of its group: pushed down where a sample beats it",
                      ["reward.kind=binary", "grpo.lr=1e-4", "grpo.greedy_member=true"]),
    # Twice the rate for half the updates: 60 updates at 1e-4 moved greedy most, but take past
    # make train's 25 minutes on the slower 2-core machines; 3e-4 was the rate that drifted.
    "greedy_member_fast": ("greedy_member at 2e-4 for 30 updates at d3: the same distance in half the updates",
                           ["reward.kind=binary", "grpo.lr=2e-4", "grpo.greedy_member=true",
                            "stages=[{difficulty: 3, updates: 30}]"]),
    # The same 32 samples an update over twice the words (16 tasks x 2, each with its greedy
    # answer): the misses are misspellings of words never trained on, so what an update teaches
    # about spelling may carry further from more words than from more samples of fewer.
    "wide_member": ("greedy_member over 16 tasks x 2 samples an update: as many samples, twice the words",
                    ["reward.kind=binary", "grpo.lr=1e-4", "grpo.greedy_member=true",
                     "grpo.tasks_per_update=16", "grpo.group_size=2"]),
    # The other way round (4 tasks x 8 samples, each with its greedy answer): as many rows an
    # update, half the words. Greedy moves where a sample beats it; with 8 samples a task
    # whose samples are right 30% of the time shows a right one 94% of the time, with 4 76%.
    "deep_member": ("greedy_member over 4 tasks x 8 samples an update: as many samples, half the words",
                    ["reward.kind=binary", "grpo.lr=1e-4", "grpo.greedy_member=true",
                     "grpo.tasks_per_update=4", "grpo.group_size=8"]),
    # The default's 60 updates at twice the peak rate, decaying to 0 by the last (cosine: the
    # same mean rate as 1e-4 constant): GRPO gains 27-46 items from a 369-step start and loses
    # 11-20, greedy answers near a decision that the last updates' full-rate steps tip either way.
    "member_cosine": ("greedy_member at 2e-4 decaying to 0 (cosine) over its 60 updates: the same mean rate, calm last steps",
                      ["reward.kind=binary", "grpo.lr=2e-4", "grpo.lr_schedule=cosine", "grpo.greedy_member=true"]),
    "kl": ("binary + KL 0.1 to the SFT start", ["reward.kind=binary", "grpo.kl_coef=0.1"]),
    "kl_strong": ("binary + KL 0.5 to the SFT start", ["reward.kind=binary", "grpo.kl_coef=0.5"]),
    "balanced": ("binary, GRPO's prompts ask letters balanced over absent / once / more (all ones right on 20% at d3, not 35%)",
                 ["reward.kind=binary", "env.options.train_letters=balanced"]),
    "balanced_mid_lr": ("balanced prompts at a third of the learning rate (1e-4)",
                        ["reward.kind=binary", "env.options.train_letters=balanced", "grpo.lr=1e-4"]),
    "mixed": ("binary, GRPO's prompts ask 2+ letters whose counts differ: no constant answer is right on any",
              ["reward.kind=binary", "env.options.train_letters=mixed"]),
    "mixed_mid_lr": ("mixed prompts at lr 1e-4: from a start that counts, no constant to drift to",
                     ["reward.kind=binary", "env.options.train_letters=mixed", "grpo.lr=1e-4"]),
    # Samples nearer the greedy answer: at temperature 1 a 135M model's samples score far
    # below its greedy answer, so the groups' differences sit at tokens greedy never picks;
    # at 0.7 they sit where the greedy choice is close, the decisions a greedy eval reads.
    "cool": ("binary, rollouts sampled at temperature 0.7", ["reward.kind=binary", "rollout.temperature=0.7"]),
    # A reward that reads the chain (letter counting's spelling_reward): half for the exact
    # answer, half for how close the chain's spelling is to the string. The one arm whose
    # reward is not a reward.kind (ARM_REWARDS); its sets keep the config's kind for the record.
    "spelling": ("0.5 x exact + 0.5 x how close the chain spells the string", []),
    # The same reward at the rate that does no harm from the balanced start (the `spelling`
    # arm ran at 3e-4, where every reward drifted): 87% of that start's greedy chains misspell.
    "spelling_mid": ("spelling reward at 1e-4: every sample graded on how it spells", ["grpo.lr=1e-4"]),
    "more_sft": ("no GRPO: the median GRPO arm's seconds spent on more SFT", []),
}



ADAPTER_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes, and an export's sft_adapter holds


def load_start_adapter(model, folder) -> None:
    """Every LoRA weight of the adapter in `folder` into the model's adapter
    (picorl.checkpoint.load_adapter_file): one on other layers is refused, naming a key,
    rather than starting a run half from it, half from the seeded init."""
    load_adapter_file(model, Path(folder) / ADAPTER_FILE)


def arm_overrides(arm: str) -> list[str]:
    """An arm's --set overrides. One that does not name the greedy member runs plain GRPO,
    whatever the base config says: configs/default.yaml has it on, and every arm above was
    measured without it unless it says otherwise."""
    sets = ARMS[arm][1]
    if arm == "more_sft" or any(s.startswith("grpo.greedy_member=") for s in sets):
        return list(sets)
    return ["grpo.greedy_member=false", *sets]


# arm -> a reward function in place of the config's reward.kind: (completion text, record) -> reward
ARM_REWARDS = {"spelling": spelling_reward, "spelling_mid": spelling_reward}


def arm_reward(arm: str, env):
    """The trainer's reward_fn for an arm of ARM_REWARDS (None: the config's reward.kind)."""
    if arm not in ARM_REWARDS:
        return None
    reward_of = ARM_REWARDS[arm]

    def reward(c, r: dict) -> tuple[float, bool, bool]:
        g = env.grade(c.text, r)
        return reward_of(c.text, r), g.exact, g.formatted
    return reward


def sampled_eval(engine, records: list[dict], k: int, temperature: float, max_tokens: int, seed: int,
                 env=None) -> dict:
    """Mean fraction of k samples exactly right (sampled accuracy) and pass@k, overall, and per
    item the count of right samples."""
    fractions = sample_records(engine, records, k, temperature=temperature, max_tokens=max_tokens, seed=seed,
                               env=env)
    figures = sampled_figures(fractions)
    return {"k": k, "temperature": temperature, "sampled_exact": figures["sampled"],
            "pass_at_k": figures["pass_at_k"], "per_item": [round(f * k) for f in fractions]}


def sampled(model, tok, cfg, records: list[dict], k: int, seed: int) -> dict:
    """sampled_eval through the config's rollout engine, at its temperature and eval.max_tokens."""
    return sampled_eval(engine_for_config(cfg, model, tok, progress=False), records, k, cfg.rollout.temperature,
                        cfg.eval.max_tokens, seed, env_of(cfg))


def greedy(model, tok, cfg, records: list[dict]) -> dict:
    """Greedy items (exact per item, completion) and their summary, decoded as the pipeline's evals."""
    greedy_engine = eval_engine(cfg, model, tok, progress=False)
    summary, items = evaluate_records(model, tok, records, max_tokens=cfg.eval.max_tokens, engine=greedy_engine,
                                      env=env_of(cfg))
    return {"greedy": summary, "items": [{k_: v for k_, v in i.items() if k_ not in ("difficulty", "answer", "prediction",
                                                                                    "partial")} for i in items]}


def measure(model, tok, cfg, records: list[dict], k: int, seed: int, fresh: list[dict] | None = None) -> dict:
    """Greedy items and the sampled figures on the eval records; greedy on the fresh records
    too, where there are some (words no run generates: does a gain carry past the eval set?)."""
    out = greedy(model, tok, cfg, records)
    if k > 1:
        out["sampled"] = sampled(model, tok, cfg, records, k, seed)
    if fresh:
        out["fresh"] = greedy(model, tok, cfg, fresh)
    return out


def run_grpo(model, tok, cfg, train_sets: dict[int, list[dict]], reward_fn=None) -> tuple[list[dict], float]:
    """cfg's stages from the model as it is (a fresh optimizer); per-update metrics and seconds."""
    engine = engine_for_config(cfg, model, tok, progress=False)
    engine.sync_weights(model)
    trainer = GRPOTrainer(model, tok, engine, cfg, reward_fn=reward_fn)
    rows, t0 = [], time.perf_counter()
    for stage in cfg.stages:
        curriculum = Curriculum.for_stage(stage)
        for _ in range(stage.updates):
            d = curriculum.difficulty
            m = trainer.update(train_sets[d])
            curriculum.observe(m["task_correct"])
            row = {k: round(v, 4) for k, v in m.items() if isinstance(v, (int, float))}
            row["difficulty"] = d
            rows.append(row)
            print(f"  update {trainer.step}: d{d} reward {m['reward_mean']:.3f} correct {m['frac_correct']:.3f} "
                  f"zero-var {m['frac_zero_var_groups']:.2f} truncated {m['frac_truncated']:.2f} "
                  f"formatted {m['frac_formatted']:.2f} len {m['completion_len']:.0f} ({m['update_s']:.1f} s)", flush=True)
    return rows, time.perf_counter() - t0


PACE_STEPS = 10  # more_sft's first steps, timed to size the rest
# model.lora knobs added after SFT starts were first cached, with their defaults: a start key
# leaves them out at those defaults, so a start trained before them is still found.
LATER_LORA_KNOBS = {k: getattr(LoraConfig(), k) for k in ("top_layers", "base_dtype")}


def steps_for_budget(budget_s: float, done: int, spent_s: float) -> int:
    """SFT steps in all that fill `budget_s` at the pace of the `done` steps that took `spent_s`.

    Worked example: a budget of 900 s, 10 steps in 36 s -> 250 steps (240 more). Never fewer
    than `done`: those are taken, whatever the budget."""
    if budget_s <= 0 or done < 1 or spent_s <= 0:
        raise ValueError(f"budget, steps and seconds must be positive, got {budget_s}, {done}, {spent_s}")
    return max(done, round(budget_s * done / spent_s))


def paired_figures(start: dict, end: dict) -> dict:
    """Greedy gained / lost and, where both were sampled, sampled rose / fell of two measure()
    results of the same items."""
    out = {"greedy": paired_change(start["items"], end["items"])}
    if "sampled" in start and "sampled" in end:  # an arm measured greedy only (--k 1) has no sampled pair
        out["sampled"] = sampled_change(start["sampled"], end["sampled"])
    if "fresh" in start and "fresh" in end:
        out["fresh"] = paired_change(start["fresh"]["items"], end["fresh"]["items"])
    return out


def arm_result(change: str, sets: list[str], start: dict, end: dict, seconds: float, updates: list[dict],
               split: dict[str, list[bool]] | None = None, records: list[dict] | None = None) -> dict:
    out = {"change": change, "sets": sets, "seconds": round(seconds, 1), **paired_figures(start, end),
           "end": end, "updates": updates}
    if records and (before := chain_figures(records, start["items"])):
        out["chains"] = {"before": before, "after": chain_figures(records, end["items"])}
    if "sampled" in start:
        out["greedy_by_samples"] = greedy_by_samples(start, end)
    if split:
        out["split"] = {name: paired_figures(subset(start, mask), subset(end, mask))
                        for name, mask in split.items() if any(mask)}  # a part with no items has no figures
    return out


def greedy_by_samples(start: dict, end: dict) -> list[dict]:
    """The greedy change split by how many of the start's k samples were right on an item:
    for each count c, the items greedy got wrong at the start and how many of them it gained,
    and those it got right and how many it lost. Greedy is the arg-max of each token, so an
    item whose samples are right half the time sits on the edge and flips either way; one the
    samples never or always get right needs RL to move the samples first. Worked example from
    a 204-step SFT start (60 updates at lr 5e-5): wrong with 0 of 4 samples right, 9 of 69
    gained; with 2 of 4, 8 of 14; right with 4 of 4, 1 of 48 lost."""
    k, counts = start["sampled"]["k"], start["sampled"]["per_item"]
    rows = [{"right_samples": c, "wrong": 0, "gained": 0, "right": 0, "lost": 0} for c in range(k + 1)]
    for c, before, after in zip(counts, start["items"], end["items"], strict=True):
        row = rows[round(c)]  # older result files hold counts as floats
        if before["exact"]:
            row["right"] += 1
            row["lost"] += not after["exact"]
        else:
            row["wrong"] += 1
            row["gained"] += bool(after["exact"])
    return rows


def asks_letters(records: list[dict]) -> bool:
    """Whether every record is a letter-counting task (asked letters, a count for each)."""
    return all(isinstance(r.get("answer"), dict) and "letters" in r for r in records)


def constant_answer_split(records: list[dict]) -> dict[str, list[bool]] | None:
    """Letter counting's eval items split by the constant answer that is right on them: every
    asked letter once ("all_ones"), every one absent ("all_zeros"), or none ("counting"). A
    policy that cannot count collapses onto the constant its training prompts pay most for,
    gaining that part and losing the rest. A gain in "counting" is not yet a count: a fixed
    pattern (all ones but a last 0) pays there too, so read the completions."""
    if not asks_letters(records):
        return None
    values = [set(r["answer"].values()) for r in records]
    return {"all_ones": [v == {1} for v in values], "all_zeros": [v == {0} for v in values],
            "counting": [v not in ({0}, {1}) for v in values]}


def chain_figures(records: list[dict], items: list[dict]) -> dict | None:
    """Where letter counting's greedy answers come from, read off their `cot` chains: of n
    items, how many chains reached the true count of every asked letter (`tally_right`), how
    many answers say what their chain counted (`answer_follows_chain`), and how many are
    exactly right by doing both (`right_by_count`). A gain in exact answers that is not a
    gain in right_by_count came from answers that ignore their own chain (a constant, or a
    prior over answers), not from counting better. None outside letter counting."""
    if not asks_letters(records):
        return None
    env = LetterCounting()
    tally_right = follows = by_count = 0
    for r, i in zip(records, items, strict=True):
        tally_right += chain_counts(i["completion"], r["letters"]) == r["answer"]
        follows += (f := env.follows_working(i["completion"], r))
        by_count += f and env.grade(i["completion"], r).exact  # what evals count as `reasoned`
    return {"n": len(items), "tally_right": tally_right, "answer_follows_chain": follows, "right_by_count": by_count}


def subset(measured: dict, mask: list[bool]) -> dict:
    """The greedy items and sampled counts of `measured` (a measure() result) where mask holds."""
    out = {"items": [i for i, keep in zip(measured["items"], mask) if keep]}
    if "sampled" in measured:
        s = measured["sampled"]
        out["sampled"] = {**s, "per_item": [c for c, keep in zip(s["per_item"], mask) if keep]}
    return out


def sampled_change(before: dict, after: dict) -> dict:
    """picorl.evaluate.sampled_change of two sampled_eval results of the same items: sampled
    accuracy and pass@k before -> after, the items whose count of right samples rose and fell,
    and the sign test of that pair."""
    def items(s: dict) -> list[dict]:
        return [{SAMPLED: c / s["k"]} for c in s["per_item"]]
    return evaluate_sampled_change(items(before), items(after))


def line(name: str, r: dict) -> str:
    g = r["greedy"]
    s = r.get("sampled")
    sampled = (f"; sampled {s['before']:.1%} -> {s['after']:.1%} (rose on {s['rose']}, fell on {s['fell']}, "
               f"p={s['p_value']:.2g}), pass@k {s['pass_before']:.1%} -> {s['pass_after']:.1%}" if s else "")
    parts = "".join(f"\n  {line(part, p)}" for part, p in r.get("split", {}).items())
    if "fresh" in r:
        f = r["fresh"]
        parts += (f"\n  fresh words: greedy {f['before']:.1%} -> {f['after']:.1%} on {f['n']} items "
                  f"(gained {f['gained']}, lost {f['lost']}, p={f['p_value']:.2g})")
    if "greedy_by_samples" in r:
        parts += "\n  greedy by the start's right samples: " + ", ".join(
            f"{b['right_samples']}: gained {b['gained']}/{b['wrong']}, lost {b['lost']}/{b['right']}"
            for b in r["greedy_by_samples"])
    seconds = f"; {r['seconds']:.0f} s" if "seconds" in r else ""
    if "chains" in r:
        b, a = r["chains"]["before"], r["chains"]["after"]
        sampled += (f"; right by counting {b['right_by_count']} -> {a['right_by_count']} (chain's tally right "
                    f"{b['tally_right']} -> {a['tally_right']}, answer follows chain {b['answer_follows_chain']} -> "
                    f"{a['answer_follows_chain']})")
    return (f"{name}: greedy {g['before']:.1%} -> {g['after']:.1%} on {g['n']} items (gained {g['gained']}, "
            f"lost {g['lost']}, p={g['p_value']:.2g}){sampled}{seconds}{parts}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml", help="the base config: SFT, stages, rollouts")
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                    help="the arms to run (all by default); none measures the start alone")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every arm")
    ap.add_argument("--eval-difficulty", type=int, default=3)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--k", type=int, default=4, help="samples per item for sampled accuracy and pass@k; 1 skips them")
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--start-dir", default="outputs/rl_recipe", help="where the SFT start is kept between runs")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="also greedy on N fresh items of the eval tier (as `picorl export --fresh`: items no run "
                         "generates), at the start and after every arm")
    ap.add_argument("--more-sft-steps", type=int, default=None, metavar="N",
                    help="more_sft trains exactly N more SFT steps instead of filling the median GRPO arm's "
                         "seconds at the pace of its own first steps")
    ap.add_argument("--start-adapter", default=None, metavar="DIR",
                    help="start every arm from this LoRA adapter (a folder with adapter_model.safetensors, e.g. "
                         "an export's sft_adapter) instead of the config's SFT; more_sft then has no SFT to go on")
    ap.add_argument("--start-sft-steps", type=int, default=0, metavar="N",
                    help="with --start-adapter: N more steps of the config's SFT from the adapter (its batches after "
                         "sft.steps, a fresh optimizer) before the start is measured; the start is kept and reused")
    ap.add_argument("--seed", type=int, default=None,
                    help="the GRPO arms' run.seed (their tasks and samples) from the same SFT start, which keeps the "
                         "config's seed: another draw of the same arms; the result file's name says it")
    args = ap.parse_args()
    if args.more_sft_steps is not None and args.more_sft_steps < 1:
        print(f"error: --more-sft-steps must be >= 1, got {args.more_sft_steps}", file=sys.stderr)
        return 2
    adapter_file = Path(args.start_adapter or ".") / ADAPTER_FILE
    if args.start_adapter and not adapter_file.is_file():
        print(f"error: --start-adapter {args.start_adapter}: no {ADAPTER_FILE} there", file=sys.stderr)
        return 2
    if args.start_sft_steps < 0:
        print(f"error: --start-sft-steps must be >= 0, got {args.start_sft_steps}", file=sys.stderr)
        return 2
    if args.start_sft_steps and not args.start_adapter:
        print(f"error: --start-sft-steps {args.start_sft_steps} goes on from --start-adapter's SFT: give the adapter",
              file=sys.stderr)
        return 2
    if args.start_adapter and "more_sft" in args.arms:
        print("error: more_sft continues the config's SFT, which --start-adapter skips: leave it out of --arms",
              file=sys.stderr)
        return 2
    # An arm's seed moves its draws only: SFT, the start's adapter and the eval's samples stay
    # the config's, so the arms of several seeds are compared with one start item by item.
    arm_sets = [f"run.seed={args.seed}"] if args.seed is not None else []
    try:
        base = load_config(args.config, args.set)
        arm_cfgs = {a: load_config(args.config, args.set + arm_overrides(a) + arm_sets) for a in args.arms}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = env_of(base)
    try:
        fresh_set = data.fresh_records(args.eval_difficulty, args.fresh, env=env) if args.fresh else None
    except ValueError as e:
        print(f"error: --fresh {args.fresh}: {e}", file=sys.stderr)
        return 2
    eval_set = data.eval_records(args.eval_difficulty, args.eval_size, env=env)
    eval_split = constant_answer_split(eval_set)
    # GRPO's prompts come from each arm's own environment (an arm may change how the train
    # split asks, e.g. env.options.train_letters); SFT and the eval set are the base config's.
    train_sets = {a: {d: data.train_records(d, c.data.train_size, seed=c.data.seed, env=env_of(c)) for d in env.tiers
                      if any(d in Curriculum.for_stage(s).reachable() for s in c.stages)}
                  for a, c in arm_cfgs.items()}
    out = {"machine": machine(), "config": {"config": args.config, "sets": args.set, "arm_seed": args.seed,
                                           "start_adapter": args.start_adapter,
                                           "start_sft_steps": args.start_sft_steps}, "eval": {
        "difficulty": args.eval_difficulty, "n": args.eval_size, "k": args.k}, "rows": {}}
    seed_tag = f"-seed{args.seed}" if args.seed is not None else ""
    stem = f"rl_recipe-{machine_tag(out['machine'])}-{Path(args.config).stem}{args.tag}{seed_tag}"
    results_dir = Path(args.results_dir)
    kept = earlier_rows(results_dir / f"{stem}.json", out, set(args.arms))

    model, tok = load_for_config(base)  # the seeded adapter
    sft_records = [r for d in base.sft.difficulties
                   for r in data.train_records(d, base.data.train_size, seed=base.data.seed, env=env)]
    params = [p for p in model.parameters() if p.requires_grad]
    sft_opt = torch.optim.AdamW(params, lr=base.sft.lr, weight_decay=0.0)
    sft_kw = dict(style=base.sft.style, batch_size=base.sft.batch_size, lr=base.sft.lr, seed=base.run.seed,
                  lr_schedule=base.sft.lr_schedule, warmup_steps=base.sft.warmup_steps,
                  group_by_length=base.sft.group_by_length, shared_prefix=base.sft.shared_prefix, optimizer=sft_opt,
                  progress=False, env=env)
    # The SFT start is kept on disk, keyed by what it depends on, so arms run in several
    # processes (or sessions) start from the same weights without paying for SFT again; its
    # measurement is keyed apart, so another eval tier or size reuses the weights.
    def digest(parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    model_key = to_dict(base.model)
    for knob, default in LATER_LORA_KNOBS.items():
        if model_key["lora"][knob] == default:
            del model_key["lora"][knob]
    sft_key = digest([model_key, to_dict(base.sft), to_dict(base.data), base.run.seed]
                     # another environment's start is another start (letter counting's keys stay)
                     + ([to_dict(base.env)] if base.env.name != "letter_counting" or base.env.options else []))
    if args.start_adapter:  # a given adapter is the start: its bytes are the key
        config_sft_key = sft_key
        sft_key = "adapter-" + hashlib.sha256(adapter_file.read_bytes()).hexdigest()[:12]
        if args.start_sft_steps:  # and the SFT it went on with: the config's, that many steps
            sft_key += f"-sft{args.start_sft_steps}-{config_sft_key}"
    eval_key = digest([to_dict(base.eval), base.rollout.engine, base.rollout.temperature, args.eval_difficulty,
                       args.eval_size])
    start_dir = Path(args.start_dir) / sft_key
    weights_file, sft_file, start_file = (start_dir / "weights.pt", start_dir / "sft.json",
                                          start_dir / f"start-{eval_key}.json")
    if args.start_adapter:
        try:
            load_start_adapter(model, args.start_adapter)
        except (ValueError, RuntimeError) as e:  # another rank, other layers, another model
            print(f"error: --start-adapter {e}", file=sys.stderr)
            return 2
        print(f"start: the adapter in {args.start_adapter}", flush=True)
    if args.start_adapter and not args.start_sft_steps:
        sft_s = None
        start_dir.mkdir(parents=True, exist_ok=True)
    elif weights_file.is_file() and sft_file.is_file():
        saved = torch.load(weights_file, weights_only=True)
        load_trained_weights(model, saved["weights"])
        sft_opt.load_state_dict(saved["optimizer"])
        sft_s = json.loads(sft_file.read_text())["sft_seconds"]
        print(f"SFT start from {start_dir} ({sft_s:.0f} s when it was made)", flush=True)
    else:
        torch.manual_seed(base.run.seed)
        t0 = time.perf_counter()
        # from a given adapter, the config's SFT goes on where its sft.steps ended (step s's
        # batch is a function of the seed and s), as if that run had been longer
        first, count = (base.sft.steps, args.start_sft_steps) if args.start_sft_steps else (0, base.sft.steps)
        train_sft(model, tok, sft_records, steps=first + count, start_step=first, **sft_kw)
        sft_s = time.perf_counter() - t0
        print(f"SFT {count} x {base.sft.batch_size}: {sft_s:.0f} s", flush=True)
        start_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": trained_weights(model), "optimizer": sft_opt.state_dict()}, weights_file)
        atomic_write_text(sft_file, json.dumps({"sft_seconds": round(sft_s, 1)}))
    if start_file.is_file():
        start = json.loads(start_file.read_text())
        if args.k > 1 and start.get("sampled", {}).get("k") != args.k:
            start["sampled"] = sampled(model, tok, base, eval_set, args.k, seed=base.run.seed + 17)
        if fresh_set and len(start.get("fresh", {}).get("items", [])) != args.fresh:
            start["fresh"] = greedy(model, tok, base, fresh_set)  # kept: the next run with --fresh reuses it
            atomic_write_text(start_file, json.dumps(start))
        elif not fresh_set:
            start.pop("fresh", None)  # the result file's start holds what this run's arms are compared on
    else:
        start = {"sft_seconds": None if sft_s is None else round(sft_s, 1), "adapter": args.start_adapter,
                 **measure(model, tok, base, eval_set, args.k, seed=base.run.seed + 17, fresh=fresh_set)}
        atomic_write_text(start_file, json.dumps(start))
    start_weights = trained_weights(model)
    start_opt = copy.deepcopy(sft_opt.state_dict())
    out["start"] = start
    what = ("after SFT" if not args.start_adapter else "the given adapter" if not args.start_sft_steps
            else f"the given adapter after {args.start_sft_steps} more SFT steps")
    print(f"{what}: greedy {start['greedy']['exact']:.1%}" +
          (f", sampled {start['sampled']['sampled_exact']:.1%}, pass@{start['sampled']['k']} "
           f"{start['sampled']['pass_at_k']:.1%}" if "sampled" in start else ""), flush=True)

    if not args.arms:  # the start alone (say, an SFT continued from --start-adapter) is the result
        out["rows"] = {a: kept[a] for a in ARMS if a in kept}
        write_result(stem, out, results_dir)
    for arm in args.arms:
        change, sets = ARMS[arm][0], arm_overrides(arm)
        load_trained_weights(model, start_weights)
        print(f"\n=== {arm}: {change}", flush=True)
        torch.manual_seed(arm_cfgs[arm].run.seed)
        if arm == "more_sft":
            grpo_s = [r["seconds"] for a, r in kept.items() if a != "more_sft"]
            if not grpo_s and args.more_sft_steps is None:
                print("more_sft: run a GRPO arm first (its seconds set the budget), or give --more-sft-steps",
                      file=sys.stderr)
                continue
            # the GRPO arms' seconds size it unless the count is given (then no budget is claimed)
            budget = statistics.median(grpo_s) if args.more_sft_steps is None else None
            sft_opt.load_state_dict(copy.deepcopy(start_opt))
            t1 = time.perf_counter()
            done = base.sft.steps
            if budget is not None:  # time the first steps here, then fill the budget at that pace
                train_sft(model, tok, sft_records, steps=done + PACE_STEPS, start_step=done, **sft_kw)
                extra = steps_for_budget(budget, PACE_STEPS, time.perf_counter() - t1)
                done += PACE_STEPS
            else:
                extra = args.more_sft_steps
            train_sft(model, tok, sft_records, steps=base.sft.steps + extra, start_step=done, **sft_kw)
            seconds, updates = time.perf_counter() - t1, []
            change = (f"no GRPO: {extra} more SFT steps" +
                      (f" (the median GRPO arm's {budget:.0f} s)" if budget is not None else ""))
        else:
            updates, seconds = run_grpo(model, tok, arm_cfgs[arm], train_sets[arm],
                                        arm_reward(arm, env_of(arm_cfgs[arm])))
        end = measure(model, tok, arm_cfgs[arm], eval_set, args.k, seed=base.run.seed + 17, fresh=fresh_set)
        kept[arm] = arm_result(change, sets, start, end, seconds, updates, eval_split, eval_set)
        # The arm's end weights, beside its start: a later question (another eval tier, fresh
        # words, a longer look at the completions) is then a measurement, not a rerun.
        arm_file = start_dir / "arms" / f"{stem}-{arm}.pt"
        arm_file.parent.mkdir(exist_ok=True)
        torch.save(trained_weights(model), arm_file)
        out["rows"] = {a: kept[a] for a in ARMS if a in kept}
        print(line(arm, kept[arm]), flush=True)
        write_result(stem, out, results_dir)
    print("")
    for a, r in out["rows"].items():
        print(line(a, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
