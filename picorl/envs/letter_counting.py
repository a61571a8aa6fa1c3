"""Letter counting: generate a task, build its prompt, parse an answer, score it.

One task: a string and the letters to count in it.

    >>> task = make_task(random.Random(0), difficulty=3)
    >>> task["string"], task["letters"], task["answer"]     # doctest: +SKIP
    ('overmodest', ['e', 'o'], {'e': 1, 'o': 2})

The parsing rule below is the only one: training rewards and evaluation both use it.
"""
from __future__ import annotations

import functools
import json
import random
import string as _string
from dataclasses import dataclass

# The 10 tiers of the reference system (ported from Atropos): tiers 1-5 count in English
# words, 6-10 in random a-z strings. (min_len, max_len, p_multi, min_letters, max_letters, random_string)
TIERS = {
    1: (3, 8, 0.0, 1, 1, False),
    2: (5, 12, 0.5, 1, 2, False),
    3: (8, 18, 0.6, 2, 3, False),
    4: (10, 25, 0.8, 3, 5, False),
    5: (15, 35, 0.9, 5, 8, False),
    6: (40, 80, 1.0, 8, 12, True),
    7: (80, 150, 1.0, 12, 20, True),
    8: (150, 250, 1.0, 18, 30, True),
    9: (250, 400, 1.0, 25, 40, True),
    10: (400, 500, 1.0, 35, 50, True),
}

SYSTEM_PROMPT = (
    "You are a careful assistant that counts letters. Think step by step, then give the "
    "final answer wrapped in <answer></answer> tags."
)


def check_difficulty(difficulty) -> int:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty not in TIERS:
        raise ValueError(f"difficulty must be an integer in 1-10, got {difficulty!r}")
    return difficulty


@functools.lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """Lower-case alphabetic English words, sorted so that a seed picks the same word everywhere."""
    from english_words import get_english_words_set

    words = get_english_words_set(["web2"], lower=True, alpha=True)
    return tuple(sorted(w for w in words if w.isascii() and w.isalpha()))


@functools.lru_cache(maxsize=16)
def words_between(lo: int, hi: int) -> tuple[str, ...]:
    return tuple(w for w in english_words() if lo <= len(w) <= hi)


def _pick_letters(rng: random.Random, text: str, n: int) -> list[str]:
    """n distinct letters, each drawn from the text's own letters with a per-task probability."""
    bias = rng.uniform(0.3, 0.9)
    present = sorted(set(text))
    chosen: list[str] = []
    while len(chosen) < n:
        pool = [c for c in present if c not in chosen]
        if not pool or rng.random() >= bias:
            pool = [c for c in _string.ascii_lowercase if c not in chosen]
        chosen.append(rng.choice(pool))
    return chosen


def make_task(rng: random.Random, difficulty: int, uniform_letters: bool = False) -> dict:
    """One task at `difficulty`: {'difficulty', 'string', 'letters', 'answer'}.

    Asked letters lean towards the string's own letters (as in the reference system), or with
    `uniform_letters` are drawn uniformly from a-z: a check that a model counts rather than
    leaning on how asked letters are usually chosen.
    """
    lo, hi, p_multi, min_k, max_k, random_string = TIERS[check_difficulty(difficulty)]
    if random_string:
        text = "".join(rng.choice(_string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))
    else:
        text = rng.choice(words_between(lo, hi))
    n = rng.randint(max(2, min_k), max_k) if rng.random() < p_multi else 1
    # Letters are distinct, so tiers 8-10 (up to 50 asked) are capped at the alphabet.
    n = min(n, len(_string.ascii_lowercase))
    letters = rng.sample(_string.ascii_lowercase, n) if uniform_letters else _pick_letters(rng, text, n)
    return {"difficulty": difficulty, "string": text, "letters": letters,
            "answer": {c: text.count(c) for c in letters}}


def build_messages(text: str, letters: list[str]) -> list[dict]:
    """The chat prompt of a task: a system message and the question with its answer format."""
    if len(letters) == 1:
        ask = f"How many times does the letter '{letters[0]}' appear in the string \"{text}\"?"
        fmt = "Give the count as a bare integer, for example <answer>3</answer>."
    else:
        names = ", ".join(f"'{c}'" for c in letters)
        ask = f"How many times does each of the letters {names} appear in the string \"{text}\"?"
        example = json.dumps({c: i for i, c in enumerate(letters[:2], start=1)})
        fmt = (f"Give a JSON object mapping each of these letters to its count, for example "
               f"<answer>{example}</answer> (with every asked letter).")
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{ask}\n{fmt}"}]


# ---------------------------------------------------------------- parsing and reward


@dataclass(frozen=True)
class Parsed:
    """A parsed answer: `counts` maps each asked letter to the model's count, or is None if unformatted."""
    counts: dict | None

    @property
    def formatted(self) -> bool:
        return self.counts is not None


UNFORMATTED = Parsed(None)
# Counts longer than this cannot be right for any string we generate; comparing them as text
# keeps a megabyte of digits from costing a megabyte-sized int conversion.
_MAX_DIGITS = 18


def _answer_body(completion: str) -> str | None:
    """Text of the last <answer>...</answer> block after the last </think>, or None."""
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


def _int_count(body: str) -> int | None:
    body = body.strip()
    if not body or not (body.isascii() and body.isdigit()):
        return None
    digits = body.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else -1  # -1: formatted, never right


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def parse_answer(completion: str, letters: list[str]) -> Parsed:
    """Apply the one parsing rule; never raises, whatever the completion holds."""
    if not isinstance(completion, str):
        return UNFORMATTED
    body = _answer_body(completion)
    if body is None:
        return UNFORMATTED
    if len(letters) == 1:
        value = _int_count(body)
        return UNFORMATTED if value is None else Parsed({letters[0]: value})
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicate_keys,
                         parse_float=lambda s: float("nan"), parse_constant=lambda s: float("nan"))
    except (ValueError, RecursionError):  # also bad JSON, huge ints (int max-digits), deep nesting
        return UNFORMATTED
    if not isinstance(obj, dict) or set(obj) != set(letters):
        return UNFORMATTED
    counts = {}
    for c in letters:
        v = obj[c]
        if type(v) is not int or v < 0:  # bool is a subclass of int; floats were made NaN above;
            return UNFORMATTED           # a count is never negative, as `-3` alone is unformatted
        counts[c] = v
    return Parsed(counts)


def fraction_right(parsed: Parsed, answer: dict) -> float:
    if not answer:
        raise ValueError("nothing to grade: the task asks for no letters")
    if not parsed.formatted:
        return 0.0
    return sum(parsed.counts[c] == n for c, n in answer.items()) / len(answer)


def reward_of(parsed: Parsed, answer: dict, *, kind: str = "binary", format_bonus: float = 0.0) -> float:
    """Reward of a parsed answer.

    partial (the reference system): 0 unformatted; one letter 1.0 right / 0.1 wrong;
            several 0.1 + 0.9 x fraction of letters exactly right.
    binary: 1 when every count is right, else 0.
    format_bonus is added to any formatted answer.
    """
    if kind not in ("binary", "partial"):
        raise ValueError(f"reward kind must be 'binary' or 'partial', got {kind!r}")
    if not parsed.formatted:
        return 0.0
    frac = fraction_right(parsed, answer)
    if kind == "binary":
        reward = float(frac == 1.0)
    else:
        reward = (1.0 if frac == 1.0 else 0.1) if len(answer) == 1 else 0.1 + 0.9 * frac
    return reward + format_bonus


def score(completion: str, letters: list[str], answer: dict, *, kind: str = "binary",
          format_bonus: float = 0.0) -> float:
    """Reward of one completion (see `reward_of`)."""
    return reward_of(parse_answer(completion, letters), answer, kind=kind, format_bonus=format_bonus)


def grade(completion: str, letters: list[str], answer: dict) -> dict:
    """Evaluation view of one completion: exact, partial (fraction right), formatted, prediction."""
    parsed = parse_answer(completion, letters)
    frac = fraction_right(parsed, answer)
    return {"exact": float(frac == 1.0), "partial": frac, "formatted": float(parsed.formatted),
            "prediction": parsed.counts}
