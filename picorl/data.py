"""Seeded data sets of an environment's tasks: records, JSONL files and `datasets.Dataset`s.

A record is one task with its prompt (letter counting's, the default environment):
    {"difficulty": 3, "string": "overmodest", "letters": ["e", "o"],
     "answer": {"e": 1, "o": 2}, "messages": [{"role": "system", ...}, {"role": "user", ...}]}

Same (environment, split, difficulty, seed) -> same records on any machine: the RNG is
seeded from a string (hashed with SHA-512 by `random`, so PYTHONHASHSEED does not matter).
Eval sets have fixed seeds in their own namespace, and training sets skip every item of
the eval set at their difficulty (by the environment's `key`), so no eval item is ever
trained on. A `fresh` set comes from a namespace of its own, distinct items none of which
is held out: items the pipeline never generated, to check that a held-out score holds
beyond it (letter counting also draws its asked letters uniformly from a-z there).

Every function takes `env` (an Environment; letter counting when left out).
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from picorl.envs import default_env
from picorl.envs.base import SPLITS, Environment
from picorl.files import atomic_folder, atomic_write_text

EVAL_SEED = 1234
# Eval sets are generated at this size and sliced, so a smaller eval is a prefix of a larger
# one and the exclusion set of training data does not depend on how many items an eval uses.
EVAL_POOL = 1024
# A draw that keeps being rejected (a repeat, or a held-out item) this many times in a row
# means the environment has run out of items: an error, not a loop that never ends.
MAX_REJECTS = 100_000


class DataError(ValueError):
    """A data file or record is malformed, or an environment cannot make the set asked for."""


def _rng(split: str, difficulty: int, seed: int) -> random.Random:
    return random.Random(f"picorl/{split}/d{difficulty}/s{seed}")


def _env(env: Environment | None) -> Environment:
    return env or default_env()


def with_messages(task: dict, env: Environment | None = None) -> dict:
    return {**task, "messages": _env(env).messages(task)}


def messages_of(record: dict, env: Environment | None = None) -> list[dict]:
    """The chat prompt of a record: its own `messages`, or the environment's built from its fields."""
    return record.get("messages") or _env(env).messages(record)


def _check_split(env: Environment, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split not in env.splits:
        raise DataError(f"env {env.name} has no {split} split (it offers {', '.join(env.splits)})")


@functools.lru_cache(maxsize=32)
def _eval_pool(env: Environment, difficulty: int, seed: int, size: int) -> str:
    rng = _rng("eval", difficulty, seed)
    pool, seen, rejects = [], set(), 0
    # Distinct items, so that one item never counts twice.
    while len(pool) < size:
        task = env.make_record(rng, difficulty, "eval")
        key = env.key(task)
        if key in seen:
            rejects += 1
            if rejects >= MAX_REJECTS:
                raise DataError(f"env {env.name} d{difficulty}: only {len(pool)} distinct eval items after "
                                f"{MAX_REJECTS} repeats in a row, {size} asked for")
            continue
        seen.add(key)
        rejects = 0
        pool.append(task)
    return json.dumps(pool)  # cached as text so callers can never mutate the cache


def eval_pool_size(difficulty: int, n: int, seed: int = EVAL_SEED, env: Environment | None = None) -> int:
    """Items the eval pool is generated at: EVAL_POOL for the fixed set (fewer when the tier has
    fewer), n for another seed; a request above what the tier has is refused."""
    env = _env(env)
    cap = env.capacity(difficulty, "eval")
    if cap is not None and n > cap:
        raise DataError(f"env {env.name} d{difficulty} has {cap} distinct eval items, {n} asked for")
    size = max(n, EVAL_POOL) if seed == EVAL_SEED else n
    return size if cap is None else min(size, cap)


def eval_records(difficulty: int, n: int, seed: int = EVAL_SEED, env: Environment | None = None) -> list[dict]:
    """The fixed held-out set at `difficulty` (its first n items; any seed but the default is a fresh set)."""
    env = _env(env)
    env.check_difficulty(difficulty)
    pool = json.loads(_eval_pool(env, difficulty, seed, eval_pool_size(difficulty, n, seed, env)))
    return [with_messages(t, env) for t in pool[:n]]


def _held_out(env: Environment, difficulty: int) -> set:
    return {env.key(r) for r in eval_records(difficulty, eval_pool_size(difficulty, 1, env=env), env=env)}


def train_records(difficulty: int, n: int, seed: int = 0, env: Environment | None = None) -> list[dict]:
    """n training tasks at `difficulty`, none of which is in the eval set."""
    return _draw_outside_eval(_env(env), "train", difficulty, n, seed)


@functools.lru_cache(maxsize=16)
def _fresh_capacity(env: Environment, difficulty: int) -> int | None:
    cap = env.capacity(difficulty, "fresh")
    return None if cap is None else cap - len(_held_out(env, difficulty))


def fresh_capacity(difficulty: int, env: Environment | None = None) -> int | None:
    """The most distinct fresh items a tier can give (its items minus the held-out ones); None
    when they do not run out (letter counting's random-string tiers)."""
    env = _env(env)
    _check_split(env, "fresh")
    env.check_difficulty(difficulty)
    return _fresh_capacity(env, difficulty)


def check_fresh_size(difficulty: int, n: int, env: Environment | None = None) -> None:
    """Refuse a fresh set larger than its tier can give: drawing distinct items past the
    pool's end would never finish."""
    cap = fresh_capacity(difficulty, env)
    if cap is not None and n > cap:
        raise ValueError(f"d{difficulty} can give at most {cap} fresh items (distinct items of its tier "
                         f"outside the held-out set), asked for {n}")


def fresh_records(difficulty: int, n: int, seed: int = 0, env: Environment | None = None) -> list[dict]:
    """n tasks the pipeline never generates: their own RNG namespace, distinct items none of
    which is in the eval set."""
    check_fresh_size(difficulty, n, env)
    return _draw_outside_eval(_env(env), "fresh", difficulty, n, seed, distinct=True)


def _draw_outside_eval(env: Environment, split: str, difficulty: int, n: int, seed: int, *,
                       distinct: bool = False) -> list[dict]:
    _check_split(env, split)
    env.check_difficulty(difficulty)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    skip = _held_out(env, difficulty)
    rng = _rng(split, difficulty, seed)
    out, rejects = [], 0
    while len(out) < n:
        task = env.make_record(rng, difficulty, split)
        key = env.key(task)
        if key in skip:
            rejects += 1
            if rejects >= MAX_REJECTS:
                raise DataError(f"env {env.name} d{difficulty}: {MAX_REJECTS} {split} draws in a row were held-out "
                                f"{'or repeated ' if distinct else ''}items; the tier has no more to give "
                                f"({len(out)} of {n} made)")
            continue
        rejects = 0
        if distinct:
            skip.add(key)
        out.append(with_messages(task, env))
    return out


def generate(split: str, difficulty: int, n: int, seed: int, env: Environment | None = None) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if split == "eval":
        return eval_records(difficulty, n, seed, env)
    if split == "fresh":
        return fresh_records(difficulty, n, seed, env)
    return train_records(difficulty, n, seed, env)


# ---------------------------------------------------------------- JSONL files


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str | Path, env: Environment | None = None) -> list[dict]:
    """Read task records; a malformed line raises DataError naming the file and line number.

    Each record is checked by the environment (`check_record`: letter counting's need only
    `string`, `letters` and `answer`, see `messages_of` for the prompt); they come back as written.
    """
    env = _env(env)
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
            try:
                out.append(env.check_record(r, f"{path}:{i}"))
            except DataError:
                raise
            except ValueError as e:
                raise DataError(str(e)) from None
    if not out:
        raise DataError(f"{path}: no records")
    return out


# ---------------------------------------------------------------- datasets.Dataset
# Arrow wants one schema per column. Letter counting's `answer` has different keys per row,
# so its Dataset stores counts as a list aligned with `letters` and rebuilds the dict on
# load; any other environment's record is stored whole as JSON text beside its prompt.


def _letter_layout(env: Environment) -> bool:
    from picorl.envs.letter_counting import LetterCounting
    return isinstance(env, LetterCounting)


def to_dataset(records: list[dict], env: Environment | None = None):
    from datasets import Dataset

    if not _letter_layout(_env(env)):
        return Dataset.from_dict({"difficulty": [int(r.get("difficulty", 0)) for r in records],
                                  "record": [json.dumps({k: v for k, v in r.items() if k != "messages"})
                                             for r in records],
                                  "messages": [r["messages"] for r in records]})
    rows = {"difficulty": [], "string": [], "letters": [], "counts": [], "messages": []}
    for r in records:
        rows["difficulty"].append(int(r.get("difficulty", 0)))
        rows["string"].append(r["string"])
        rows["letters"].append(list(r["letters"]))
        rows["counts"].append([r["answer"][c] for c in r["letters"]])
        rows["messages"].append(r["messages"])
    return Dataset.from_dict(rows)


def from_dataset(ds) -> list[dict]:
    if "record" in ds.column_names:
        return [{**json.loads(row["record"]), "messages": row["messages"]} for row in ds]
    return [{"difficulty": row["difficulty"], "string": row["string"], "letters": row["letters"],
             "answer": dict(zip(row["letters"], row["counts"])), "messages": row["messages"]}
            for row in ds]


def save_dataset(records: list[dict], path: str | Path, env: Environment | None = None) -> Path:
    """Save records with `Dataset.save_to_disk`, atomically (temp folder, then rename)."""
    path = Path(path)
    with atomic_folder(path, replace=True) as tmp:
        to_dataset(records, env).save_to_disk(str(tmp))
    return path


def load_records(path: str | Path, env: Environment | None = None) -> list[dict]:
    """Records from a saved Dataset folder (either layout) or a JSONL file (checked by `env`)."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk
        return from_dataset(load_from_disk(str(path)))
    return read_jsonl(path, env)
