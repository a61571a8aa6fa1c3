"""Seeded data sets of letter-counting tasks: records, JSONL files and `datasets.Dataset`s.

A record is one task with its prompt:
    {"difficulty": 3, "string": "overmodest", "letters": ["e", "o"],
     "answer": {"e": 1, "o": 2}, "messages": [{"role": "system", ...}, {"role": "user", ...}]}

Same (split, difficulty, seed) -> same records on any machine: the RNG is seeded from a
string (hashed with SHA-512 by `random`, so PYTHONHASHSEED does not matter) and the word
list is sorted. Eval sets have fixed seeds in their own namespace, and training sets skip
every string of the eval set at their difficulty, so no eval string is ever trained on.
A `fresh` set comes from a namespace of its own, with the asked letters drawn uniformly from
a-z: strings the pipeline never generated, to check that a held-out score holds beyond it.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from picorl.envs.letter_counting import TIERS, build_messages, check_difficulty, make_task, words_between
from picorl.files import atomic_folder, atomic_write_text

EVAL_SEED = 1234
# Eval sets are generated at this size and sliced, so a smaller eval is a prefix of a larger
# one and the exclusion set of training data does not depend on how many items an eval uses.
EVAL_POOL = 1024
SPLITS = ("train", "eval", "fresh")


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and line."""


def _rng(split: str, difficulty: int, seed: int) -> random.Random:
    return random.Random(f"picorl/{split}/d{difficulty}/s{seed}")


def with_messages(task: dict) -> dict:
    return {**task, "messages": build_messages(task["string"], task["letters"])}


def messages_of(record: dict) -> list[dict]:
    """The chat prompt of a record: its own `messages`, or the standard one built from string and letters."""
    return record.get("messages") or build_messages(record["string"], record["letters"])


@functools.lru_cache(maxsize=32)
def _eval_pool(difficulty: int, seed: int, size: int) -> str:
    rng = _rng("eval", difficulty, seed)
    pool, seen = [], set()
    # Distinct strings, so that one item never counts twice; tier 1 has plenty of short words.
    while len(pool) < size:
        task = make_task(rng, difficulty)
        if task["string"] not in seen:
            seen.add(task["string"])
            pool.append(task)
    return json.dumps(pool)  # cached as text so callers can never mutate the cache


def eval_records(difficulty: int, n: int, seed: int = EVAL_SEED) -> list[dict]:
    """The fixed held-out set at `difficulty` (its first n items; any seed but the default is a fresh set)."""
    check_difficulty(difficulty)
    size = max(n, EVAL_POOL) if seed == EVAL_SEED else n
    return [with_messages(t) for t in json.loads(_eval_pool(difficulty, seed, size))[:n]]


def train_records(difficulty: int, n: int, seed: int = 0) -> list[dict]:
    """n training tasks at `difficulty`, none of whose strings is in the eval set."""
    return _draw_outside_eval("train", difficulty, n, seed)


@functools.lru_cache(maxsize=16)
def fresh_capacity(difficulty: int) -> int | None:
    """The most distinct fresh strings a word tier can give (its words minus the held-out
    ones); None for the random-string tiers, whose strings do not run out."""
    if TIERS[check_difficulty(difficulty)][5]:
        return None
    lo, hi = TIERS[difficulty][:2]
    held_out = {r["string"] for r in eval_records(difficulty, EVAL_POOL)}
    return len(set(words_between(lo, hi)) - held_out)


def check_fresh_size(difficulty: int, n: int) -> None:
    """Refuse a fresh set larger than its tier can give: drawing distinct strings past the
    pool's end would never finish."""
    cap = fresh_capacity(difficulty)
    if cap is not None and n > cap:
        raise ValueError(f"d{difficulty} can give at most {cap} fresh items (distinct words of its lengths "
                         f"outside the held-out set), asked for {n}")


def fresh_records(difficulty: int, n: int, seed: int = 0) -> list[dict]:
    """n tasks the pipeline never generates: their own RNG namespace, distinct strings none of
    which is in the eval set, asked letters drawn uniformly from a-z."""
    check_fresh_size(difficulty, n)
    return _draw_outside_eval("fresh", difficulty, n, seed, distinct=True, uniform_letters=True)


def _draw_outside_eval(namespace: str, difficulty: int, n: int, seed: int, *, distinct: bool = False,
                       uniform_letters: bool = False) -> list[dict]:
    check_difficulty(difficulty)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    skip = {r["string"] for r in eval_records(difficulty, EVAL_POOL)}
    rng = _rng(namespace, difficulty, seed)
    out = []
    while len(out) < n:
        task = make_task(rng, difficulty, uniform_letters=uniform_letters)
        if task["string"] not in skip:
            if distinct:
                skip.add(task["string"])
            out.append(with_messages(task))
    return out


def generate(split: str, difficulty: int, n: int, seed: int) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if split == "eval":
        return eval_records(difficulty, n, seed)
    if split == "fresh":
        return fresh_records(difficulty, n, seed)
    return train_records(difficulty, n, seed)


# ---------------------------------------------------------------- JSONL files


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _check_record(r, where: str) -> dict:
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(r).__name__}")
    for key in ("string", "letters", "answer"):
        if key not in r:
            raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(r["string"], str):
        raise DataError(f"{where}: 'string' must be a string")
    letters = r["letters"]
    if not isinstance(letters, list) or not letters or not all(isinstance(c, str) and len(c) == 1 for c in letters):
        raise DataError(f"{where}: 'letters' must be a non-empty list of single characters")
    if len(set(letters)) != len(letters):
        raise DataError(f"{where}: 'letters' names a letter twice: {letters}")
    answer = r["answer"]
    if not isinstance(answer, dict) or set(answer) != set(letters) or \
            not all(type(v) is int for v in answer.values()):
        raise DataError(f"{where}: 'answer' must map each of {letters} to an integer count")
    # The prompt must be that of the fields graded against: an edited string or answer with
    # the old `messages` would ask one question and grade another.
    if "messages" in r and r["messages"] != build_messages(r["string"], letters):
        raise DataError(f"{where}: 'messages' is not the prompt of its 'string' and 'letters' (one edited "
                        "without the other?); drop 'messages' and the prompt is built from the fields")
    return r


def read_jsonl(path: str | Path) -> list[dict]:
    """Read task records; a malformed line raises DataError naming the file and line number.

    Records need only `string`, `letters` and `answer` (see `messages_of` for the prompt);
    they come back as written.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        lines = enumerate(f, start=1)
        while True:
            try:
                i, line = next(lines)
            except StopIteration:
                break
            except UnicodeDecodeError:
                raise DataError(f"{path}: not a UTF-8 text file (JSONL expected)") from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            out.append(_check_record(r, f"{path}:{i}"))
    if not out:
        raise DataError(f"{path}: no records")
    return out


# ---------------------------------------------------------------- datasets.Dataset
# Arrow wants one schema per column, and `answer` has different keys per row, so the
# Dataset stores counts as a list aligned with `letters` and rebuilds the dict on load.


def to_dataset(records: list[dict]):
    from datasets import Dataset

    rows = {"difficulty": [], "string": [], "letters": [], "counts": [], "messages": []}
    for r in records:
        rows["difficulty"].append(int(r.get("difficulty", 0)))
        rows["string"].append(r["string"])
        rows["letters"].append(list(r["letters"]))
        rows["counts"].append([r["answer"][c] for c in r["letters"]])
        rows["messages"].append(r["messages"])
    return Dataset.from_dict(rows)


def from_dataset(ds) -> list[dict]:
    return [{"difficulty": row["difficulty"], "string": row["string"], "letters": row["letters"],
             "answer": dict(zip(row["letters"], row["counts"])), "messages": row["messages"]}
            for row in ds]


def save_dataset(records: list[dict], path: str | Path) -> Path:
    """Save records with `Dataset.save_to_disk`, atomically (temp folder, then rename)."""
    path = Path(path)
    with atomic_folder(path, replace=True) as tmp:
        to_dataset(records).save_to_disk(str(tmp))
    return path


def load_records(path: str | Path) -> list[dict]:
    """Records from a saved Dataset folder or a JSONL file."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk
        return from_dataset(load_from_disk(str(path)))
    return read_jsonl(path)
