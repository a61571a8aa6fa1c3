"""The environment interface: everything picoRL knows about a verifiable task.

The pipeline (data sets, SFT, curriculum GRPO, evals, export, the served model) asks an
environment five things, and nothing else about the task:

    tiers                                 {1: "2-digit sums", 2: ...}: difficulties, numbered from 1
    make_record(rng, difficulty, split)   one seeded task as a JSON-able dict holding "difficulty"
    messages(record)                      its chat prompt
    parse(completion, record)             the prediction in a completion, None when unformatted
    fraction_right(prediction, record)    how much of a (formatted) prediction is right, in [0, 1]

From the last two, `grade` derives what rewards and evals use, so one parsing rule serves
both. An environment that offers SFT demonstrations names their styles in `demo_styles`
and writes them in `demonstration`. A worked example, complete (run it with
`env.name=mymodule:Reverse`, `sft.enabled=false`, one stage at difficulty 1):

    class Reverse(Environment):
        name = "reverse"
        tiers = {1: "3 letters", 2: "5 letters"}

        def make_record(self, rng, difficulty, split):
            word = "".join(rng.choice("abcdefgh") for _ in range(2 * difficulty + 1))
            return {"difficulty": difficulty, "word": word, "answer": word[::-1]}

        def messages(self, record):
            return [{"role": "user", "content": f"Reverse '{record['word']}'. Reply <answer>...</answer>."}]

        def parse(self, completion, record):
            return answer_body(completion)           # the text in the last <answer></answer>, or None

        def fraction_right(self, prediction, record):
            return float(prediction.strip() == record["answer"])

Splits: `train` feeds SFT and GRPO, `eval` is the fixed held-out set, `fresh` a draw the
pipeline never makes (an environment may make it differently, e.g. letters drawn uniformly).
All splits draw from one pool of items; the data layer keeps eval items (by `key`) out of
the others, so no eval item is ever trained on.
"""
from __future__ import annotations

import abc
import json
import random
from dataclasses import dataclass
from typing import Any

SPLITS = ("train", "eval", "fresh")


class EnvError(ValueError):
    """An environment cannot be loaded or used as asked; the message names the value."""


@dataclass(frozen=True)
class Grade:
    """One completion graded on its record.

    exact: fully right (what eval accuracy and the binary reward count); partial: the fraction
    right (0 when unformatted); formatted: the answer could be parsed; prediction: what was parsed.
    """
    exact: bool
    partial: float
    formatted: bool
    prediction: Any = None

    def as_item(self) -> dict:
        """The grade as eval-item fields."""
        return {"exact": float(self.exact), "partial": self.partial, "formatted": float(self.formatted),
                "prediction": self.prediction}


REWARD_KINDS = ("binary", "partial")


def reward_of_grade(grade: Grade, kind: str = "binary", format_bonus: float = 0.0) -> float:
    """The reward of a graded completion.

    unformatted: 0, whatever the kind (the format bonus too: it rewards a formatted answer).
    binary: 1 when exactly right, else 0.  partial: 0.1 + 0.9 x fraction right, so any formatted
    answer beats an unformatted one and a fully right one gets 1.0 (with one asked letter the
    fraction is 0 or 1, so 0.1 or 1.0). format_bonus is then added.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be 'binary' or 'partial', got {kind!r}")
    if not grade.formatted:
        return 0.0
    reward = float(grade.exact) if kind == "binary" else 0.1 + 0.9 * grade.partial
    return reward + format_bonus


def answer_body(completion: str) -> str | None:
    """Text of the last <answer>...</answer> block after the last </think>, or None.

    The rule every built-in environment parses with: a chain of thought may mention
    <answer> tags; only the final block after it counts.
    """
    if not isinstance(completion, str):
        return None
    think_end = completion.rfind("</think>")
    if think_end >= 0:
        completion = completion[think_end + len("</think>"):]
    close = completion.rfind("</answer>")
    if close < 0:
        return None
    open_ = completion.rfind("<answer>", 0, close)
    if open_ < 0:
        return None
    return completion[open_ + len("<answer>"):close]


class Environment(abc.ABC):
    """A verifiable task: tiers, seeded records, prompts, the parsing rule and its grade."""

    name: str = ""
    tiers: dict[int, str] = {}
    demo_styles: tuple[str, ...] = ()  # SFT demonstration styles offered; () when none
    splits: tuple[str, ...] = SPLITS

    def __init__(self, **options):
        if options:
            raise EnvError(f"env {self.name} takes no env.options, got {', '.join(sorted(options))}")

    # ------------------------------------------------------------ what an environment writes

    @abc.abstractmethod
    def make_record(self, rng: random.Random, difficulty: int, split: str) -> dict:
        """One task at `difficulty` for `split`, drawn with `rng` only (same seed, same record)."""

    @abc.abstractmethod
    def messages(self, record: dict) -> list[dict]:
        """The chat prompt of a record."""

    @abc.abstractmethod
    def parse(self, completion: str, record: dict):
        """The prediction a completion gives, or None when it is unformatted. Never raises."""

    @abc.abstractmethod
    def fraction_right(self, prediction, record: dict) -> float:
        """How much of a formatted prediction is right, in [0, 1]; 1.0 is exactly right."""

    def demonstration(self, record: dict, style: str, tokenizer=None) -> str:
        """The assistant's SFT target for a record in `style` (one of demo_styles)."""
        raise EnvError(f"env {self.name} offers no SFT demonstrations: set sft.enabled=false")

    def follows_working(self, completion: str, record: dict) -> bool | None:
        """Whether a completion's answer is what its own working (its chain of thought, read
        step by step) derives; None when the environment does not read working (the default).
        Evals count an exact answer that also follows its working as `reasoned`: an exact
        figure that rises while `reasoned` does not came from answers that ignore their own
        working (a constant, a prior over answers), not from solving more items."""
        return None

    def key(self, record: dict) -> str:
        """What makes two records the same item (eval items are kept out of training by it)."""
        return json.dumps(self.messages(record), sort_keys=True)

    def capacity(self, difficulty: int, split: str) -> int | None:
        """How many distinct items (by key) a split can make at `difficulty`, eval items included;
        None when they do not run out. Data sets larger than this are refused up front."""
        return None

    def check_record(self, record, where: str) -> dict:
        """A record read from a file, checked; raise ValueError naming `where` and the field."""
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        d = record.get("difficulty")
        if d is not None and d not in self.tiers:
            raise ValueError(f"{where}: difficulty {d!r} is not a tier of {self.name} ({tier_range(self)})")
        return self.check_task(record, where)

    def check_task(self, task, where: str) -> dict:
        """A task given to a served model (no answer needed): its prompt must build."""
        if not isinstance(task, dict):
            raise ValueError(f"{where}: expected a task object, got {type(task).__name__} {str(task)[:80]!r}")
        try:
            self.messages(task)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{where}: {self.name} cannot build a prompt from {str(task)[:120]!r} "
                             f"({type(e).__name__}: {e})") from None
        return task

    # ------------------------------------------------------------ what the pipeline uses

    def grade(self, completion: str, record: dict) -> Grade:
        """Parse once, grade once: the reward and the eval both read this."""
        prediction = self.parse(completion, record)
        if prediction is None:
            return Grade(exact=False, partial=0.0, formatted=False, prediction=None)
        frac = float(self.fraction_right(prediction, record))
        return Grade(exact=frac == 1.0, partial=frac, formatted=True, prediction=prediction)

    def check_difficulty(self, difficulty) -> int:
        if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty not in self.tiers:
            raise EnvError(f"difficulty must be a tier of {self.name} ({tier_range(self)}), got {difficulty!r}")
        return difficulty

    @property
    def top_tier(self) -> int:
        return max(self.tiers)


def tier_range(env: Environment) -> str:
    return f"1-{max(env.tiers)}" if len(env.tiers) > 1 else "1"


def check_environment(env) -> Environment:
    """Refuse an object that does not implement the interface, naming what is wrong."""
    cls = type(env).__name__
    if not isinstance(env, Environment):
        raise EnvError(f"{cls} is not a picorl.envs.base.Environment")
    if not isinstance(env.name, str) or not env.name:
        raise EnvError(f"{cls}.name must be a non-empty string, got {env.name!r}")
    tiers = env.tiers
    if not isinstance(tiers, dict) or not tiers:
        raise EnvError(f"{cls}.tiers must be a non-empty dict {{difficulty: name}}, got {tiers!r}")
    if sorted(tiers) != list(range(1, len(tiers) + 1)) or any(isinstance(k, bool) for k in tiers):
        raise EnvError(f"{cls}.tiers must be numbered 1, 2, ... without gaps, got {sorted(tiers)!r}")
    if not all(isinstance(v, str) for v in tiers.values()):
        raise EnvError(f"{cls}.tiers must name each tier with a string")
    if not isinstance(env.demo_styles, tuple) or not all(isinstance(s, str) for s in env.demo_styles):
        raise EnvError(f"{cls}.demo_styles must be a tuple of style names, got {env.demo_styles!r}")
    if not set(env.splits) <= set(SPLITS) or "train" not in env.splits or "eval" not in env.splits:
        raise EnvError(f"{cls}.splits must hold train and eval (and may hold fresh), got {env.splits!r}")
    return env
