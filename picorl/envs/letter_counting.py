"""Letter counting: generate a task, build its prompt, parse an answer, score it.

One task: a string and the letters to count in it.

    >>> task = make_task(random.Random(0), difficulty=3)
    >>> task["string"], task["letters"], task["answer"]     # doctest: +SKIP
    ('overmodest', ['e', 'o'], {'e': 1, 'o': 2})

The parsing rule below is the only one: training rewards and evaluation both use it.
"""
from __future__ import annotations

import difflib
import functools
import json
import random
import re
import string as _string
from dataclasses import dataclass

from picorl.envs.base import Environment, EnvError, answer_body

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


def _balanced_letters(rng: random.Random, text: str, n: int) -> list[str]:
    """n distinct letters whose counts spread evenly over absent, once and more than once.

    Each letter first draws one of the three kinds that still has a letter left, uniformly,
    then a letter of that kind. Under the leaning rule most asked letters occur exactly once
    in a word (d3: the answer "1 for every letter" is right on 36% of tasks), so a policy
    can score without counting; here no constant count is right on more than a third of
    the letters. Worked example: "overmodest" has e and o twice, m r s t v d once; an ask of
    two letters might draw kinds (twice, absent) and give ['o', 'q'] -> {'o': 2, 'q': 0}.
    """
    counts = {c: text.count(c) for c in _string.ascii_lowercase}
    kinds = [[c for c, k in counts.items() if k == 0], [c for c, k in counts.items() if k == 1],
             [c for c, k in counts.items() if k >= 2]]
    chosen: list[str] = []
    while len(chosen) < n:
        kind = rng.choice([pool for pool in kinds if pool])
        letter = rng.choice(kind)
        kind.remove(letter)
        chosen.append(letter)
    return chosen


def _mixed_letters(rng: random.Random, text: str, n: int) -> list[str]:
    """Balanced letters (n >= 2) redrawn until their counts are not all equal: no constant
    answer is right on the task. Balancing alone moves the shortcut rather than removing it
    (a policy that cannot count finds the best constant, all zeros where all ones no longer
    pays); here a right answer needs at least two different counts. A string whose 26
    letters all share one count (each letter once) has no mixed draw: it gets a balanced one.
    Worked example: "dog", two letters: ['d', 'x'] -> {'d': 1, 'x': 0} is kept,
    ['d', 'g'] -> {'d': 1, 'g': 1} is drawn again."""
    if len({text.count(c) for c in _string.ascii_lowercase}) == 1:
        return _balanced_letters(rng, text, max(n, 2))
    while True:  # any other string has two letters of different counts: a draw ends it
        asked = _balanced_letters(rng, text, max(n, 2))
        if len({text.count(c) for c in asked}) > 1:
            return asked


# How a task's asked letters are drawn (see make_task).
LETTER_RULES = ("leaning", "balanced", "mixed", "uniform")


def make_task(rng: random.Random, difficulty: int, letters: str = "leaning") -> dict:
    """One task at `difficulty`: {'difficulty', 'string', 'letters', 'answer'}.

    Asked letters (`letters`): "leaning" towards the string's own letters (as in the reference
    system); "balanced" so that absent, once and more than once are equally likely (see
    _balanced_letters); "mixed", balanced with at least two letters whose counts differ, so
    no constant answer is right (_mixed_letters); "uniform" from a-z, a check that a model
    counts rather than leaning on how asked letters are usually chosen.
    """
    if letters not in LETTER_RULES:
        raise ValueError(f"letters must be one of {', '.join(LETTER_RULES)}, got {letters!r}")
    lo, hi, p_multi, min_k, max_k, random_string = TIERS[check_difficulty(difficulty)]
    if random_string:
        text = "".join(rng.choice(_string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))
    else:
        text = rng.choice(words_between(lo, hi))
    n = rng.randint(max(2, min_k), max_k) if rng.random() < p_multi else 1
    # Letters are distinct, so tiers 8-10 (up to 50 asked) are capped at the alphabet.
    n = min(n, len(_string.ascii_lowercase))
    pick = {"leaning": _pick_letters, "balanced": _balanced_letters, "mixed": _mixed_letters,
            "uniform": lambda rng_, _text, n_: rng_.sample(_string.ascii_lowercase, n_)}[letters]
    asked = pick(rng, text, n)
    return {"difficulty": difficulty, "string": text, "letters": asked,
            "answer": {c: text.count(c) for c in asked}}


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
    body = answer_body(completion)
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


# ---------------------------------------------------------------- SFT demonstrations
# Three target styles teach the answer format (and, with `cot`, a way to count) before RL:
#
# direct (the reference run): the answer tag only.
#     <answer>{"e": 1, "o": 2}</answer>
#
# cot: spell the string one character per step and tag each asked letter with its running
# count, then answer with the last count of each letter.
#     <think>o1 v e1 r m o2 d e2 s t</think>
#     <answer>{"e": 2, "o": 2}</answer>
#
# Why this shape works for a 135M model: every step is local. Emitting the next character
# means finding where the spelled-out tail sits in the prompt's string and copying the next
# letter; a count is "the last count of this letter + 1", found by looking back for the same
# letter; the answer is each letter's last count. Nothing has to be held across a long span.
# Each character is one token (" x") and a count one or two more, so the chain costs about
# 1.4 tokens per character: at d6 (40-80 characters, 8-12 letters) 157 tokens on average and
# 202 at most over the first 64 held-out items (SmolLM2 tokenizer), well inside max_tokens.
#
# cot_tokens: the same tally, one line per token of the string as the tokenizer cut it in
# the prompt: the token copied, then its letters.
#     <think>
#     over: o1 v e1 r
#     mod: m o2 d
#     est: e2 s t
#     </think>
#     <answer>{"e": 2, "o": 2}</answer>
#
# Why it was tried: the model reads the string as multi-letter tokens, and the 135M model's
# cot misses are mostly misspellings. Here the place in the string is explicit: copying the
# next token is a lookup of the prompt, and spelling it needs only that token, right before.
# What it showed (docs/cot-sft.md): at d3 it scores as cot does, every token is
# copied right, and the misses spell a token wrong; so cot, shorter, stays the default.
# The line's token is the same token id as in the prompt (it follows a newline, as the
# string follows a quote). The line heads cost tokens: over the first 64 held-out
# items 46 on average (67 at most) against cot's 35 at d3, and 265 (345 at most) against
# 157 at d6.

STYLES = ("direct", "cot", "cot_tokens")


def answer_text(letters: list[str], answer: dict) -> str:
    if len(letters) == 1:
        return f"<answer>{answer[letters[0]]}</answer>"
    return "<answer>" + json.dumps({c: answer[c] for c in letters}) + "</answer>"


def _tallied(chars: str, counts: dict) -> list[str]:
    """Each character, with its running count when it is an asked letter (updates counts)."""
    steps = []
    for ch in chars:
        if ch in counts:
            counts[ch] += 1
            steps.append(f"{ch}{counts[ch]}")
        else:
            steps.append(ch)
    return steps


def cot_text(string: str, letters: list[str]) -> str:
    return "<think>" + " ".join(_tallied(string, dict.fromkeys(letters, 0))) + "</think>\n"


_TALLY = re.compile(r"([a-z])(\d{1,9})")
_STEP = re.compile(r"[a-z]\d{0,9}")


def _chain_steps(completion: str) -> list[str] | None:
    """The whitespace-separated steps of a completion's closed <think> chain, or None."""
    if not isinstance(completion, str):
        return None
    start, end = completion.find("<think>"), completion.find("</think>")
    if start < 0 or end < start:
        return None
    return completion[start + len("<think>"):end].split()


def chain_counts(completion: str, letters: list[str]) -> dict | None:
    """The count a `cot` (or `cot_tokens`) chain reached for each asked letter: its last running
    tag (`o2` -> 2), 0 for a letter it never tagged; None when the completion has no closed
    <think> chain. Read beside the answer it shows whether a miss is in the counting (the
    chain's tally is wrong) or in the answering (the answer does not say what the chain
    counted). Worked example: "<think>o1 v e1 r m o2 d e2 s t</think>" for ['e', 'o', 'x']
    -> {'e': 2, 'o': 2, 'x': 0}."""
    steps = _chain_steps(completion)
    if steps is None:
        return None
    counts = dict.fromkeys(letters, 0)
    for step in steps:
        tag = _TALLY.fullmatch(step)
        if tag and tag.group(1) in counts:
            counts[tag.group(1)] = int(tag.group(2))
    return counts


def chain_spelling(completion: str) -> str | None:
    """The string a `cot` chain spelled, one character a step (tags dropped: "o1" -> "o"); a
    step that is not one letter with an optional tag reads as "?", so a chain that writes
    the word whole has not spelled it. None when there is no closed <think> chain."""
    steps = _chain_steps(completion)
    return None if steps is None else "".join(step[0] if _STEP.fullmatch(step) else "?" for step in steps)


def chain_closeness(completion: str, string: str) -> float:
    """How close a chain's spelling is to `string`: difflib's ratio, 1 when equal, 0 for no
    closed chain. Worked example: "<think>m o1 n</think>" against "moon" -> 2 x 3 / 7 = 0.857."""
    spelled = chain_spelling(completion) or ""
    return difflib.SequenceMatcher(None, spelled, string, autojunk=False).ratio()


def spelling_reward(completion: str, record: dict) -> float:
    """A reward that reads the chain as well as the answer: 0.5 for an exactly right answer
    plus 0.5 x how close the chain's spelling is to the string (difflib's ratio, 1 when
    equal); 0 when the answer is unformatted. The misses of a model that tallies are
    misspellings, which the binary reward pays whenever they miss the asked letters; here
    every letter spelt counts. Worked example, "moon" asked o: "<think>m o1 o2 n</think>
    <answer>2</answer>" -> 1.0; "<think>m o1 n</think><answer>1</answer>" -> 0.5 x 6/7 =
    0.43; the same chain answering 2 -> 0.93."""
    parsed = parse_answer(completion, record["letters"])
    if not parsed.formatted:
        return 0.0
    return 0.5 * float(parsed.counts == record["answer"]) + 0.5 * chain_closeness(completion, record["string"])


def string_tokens(tokenizer, string: str) -> list[str]:
    """The string cut into the pieces the tokenizer makes of it inside the prompt."""
    ids = tokenizer(string, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


def cot_tokens_text(pieces: list[str], letters: list[str]) -> str:
    counts = dict.fromkeys(letters, 0)
    lines = [f"{piece}: {' '.join(_tallied(piece, counts))}" for piece in pieces]
    return "<think>\n" + "\n".join(lines) + "\n</think>\n"


def demonstration(record: dict, style: str, tokenizer=None) -> str:
    """The assistant's target text for one task (cot_tokens needs the tokenizer)."""
    if style not in STYLES:
        raise ValueError(f"sft.style must be one of {', '.join(STYLES)}, got {style!r}")
    if style == "cot":
        head = cot_text(record["string"], record["letters"])
    elif style == "cot_tokens":
        if tokenizer is None:
            raise ValueError("sft.style cot_tokens cuts the string where the tokenizer does: pass the tokenizer")
        head = cot_tokens_text(string_tokens(tokenizer, record["string"]), record["letters"])
    else:
        head = ""
    return head + answer_text(record["letters"], record["answer"])


# ---------------------------------------------------------------- the environment


def check_task_fields(task, where: str) -> dict:
    """{"string", "letters"} checked (a served task, or a record before its answer is)."""
    if not isinstance(task, dict) or "string" not in task or "letters" not in task:
        raise ValueError(f"{where}: expected {{'string': ..., 'letters': [...]}}, got {str(task)[:120]!r}")
    string, letters = task["string"], task["letters"]
    if not isinstance(string, str) or not string:
        raise ValueError(f"{where}: 'string' must be a non-empty string, got {string!r}")
    letters = list(letters) if not isinstance(letters, str) and hasattr(letters, "__iter__") else letters
    if not isinstance(letters, list) or not letters or \
            not all(isinstance(c, str) and len(c) == 1 for c in letters) or len(set(letters)) != len(letters):
        raise ValueError(f"{where}: 'letters' must be a non-empty list of distinct single characters, "
                         f"got {task['letters']!r}")
    return {"string": string, "letters": letters}


class LetterCounting(Environment):
    """How many times does each asked letter appear in a string? Ten tiers (see TIERS)."""

    name = "letter_counting"
    tiers = {d: (f"{lo}-{hi} random letters" if rand else f"English words of {lo}-{hi} letters") +
             (", one letter asked" if hi_k == 1 else f", up to {hi_k} letters asked")
             for d, (lo, hi, _, _, hi_k, rand) in TIERS.items()}
    demo_styles = STYLES

    def __init__(self, train_letters: str = "leaning"):
        # Only the train split (SFT and GRPO data) follows the option: the eval split keeps
        # the leaning rule, so held-out items are the same whatever a run trains on.
        if train_letters not in LETTER_RULES:
            raise EnvError(f"env.options.train_letters must be one of {', '.join(LETTER_RULES)}, "
                           f"got {train_letters!r}")
        self.train_letters = train_letters

    def check_difficulty(self, difficulty):
        return check_difficulty(difficulty)

    def make_record(self, rng, difficulty, split):
        # fresh: asked letters uniform over a-z, a check that the model counts (see make_task)
        rule = {"fresh": "uniform", "train": self.train_letters}.get(split, "leaning")
        return make_task(rng, difficulty, letters=rule)

    def messages(self, record):
        return build_messages(record["string"], record["letters"])

    def parse(self, completion, record):
        return parse_answer(completion, record["letters"]).counts

    def fraction_right(self, prediction, record):
        return fraction_right(Parsed(prediction), record["answer"])

    def demonstration(self, record, style, tokenizer=None):
        return demonstration(record, style, tokenizer)

    def follows_working(self, completion, record):
        # a chain counts; the answer should say what it counted (no closed chain: no working)
        chain = chain_counts(completion, record["letters"])
        return chain is not None and chain == self.parse(completion, record)

    def key(self, record):
        return record["string"]  # an eval string is never trained on, whichever letters are asked

    def capacity(self, difficulty, split):
        lo, hi, *_, random_string = TIERS[self.check_difficulty(difficulty)]
        return None if random_string else len(words_between(lo, hi))

    def check_task(self, task, where):
        return check_task_fields(task, where)

    def check_record(self, r, where):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
        for key in ("string", "letters", "answer"):
            if key not in r:
                raise ValueError(f"{where}: missing field '{key}'")
        if not isinstance(r["string"], str):
            raise ValueError(f"{where}: 'string' must be a string")
        letters = r["letters"]
        if not isinstance(letters, list) or not letters or not all(isinstance(c, str) and len(c) == 1 for c in letters):
            raise ValueError(f"{where}: 'letters' must be a non-empty list of single characters")
        if len(set(letters)) != len(letters):
            raise ValueError(f"{where}: 'letters' names a letter twice: {letters}")
        answer = r["answer"]
        if not isinstance(answer, dict) or set(answer) != set(letters) or \
                not all(type(v) is int for v in answer.values()):
            raise ValueError(f"{where}: 'answer' must map each of {letters} to an integer count")
        # The prompt must be that of the fields graded against: an edited string or answer with
        # the old `messages` would ask one question and grade another.
        if "messages" in r and r["messages"] != build_messages(r["string"], letters):
            raise ValueError(f"{where}: 'messages' is not the prompt of its 'string' and 'letters' (one edited "
                             "without the other?); drop 'messages' and the prompt is built from the fields")
        return r
