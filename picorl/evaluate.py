"""Greedy evaluation on fixed held-out sets.

    summary, items = evaluate_records(model, tokenizer, records)
    summary == {"exact": 0.91, "partial": 0.97, "formatted": 1.0, "n": 128}

Each item repeats its input record and adds the completion, the parsed prediction and its
grade, so an eval table can be read line by line.
"""
from __future__ import annotations

from picorl.data import messages_of
from picorl.envs.letter_counting import grade
from picorl.rollout import Sampling
from picorl.rollout.hf import HFEngine


def summarise(items: list[dict]) -> dict:
    n = len(items)
    return {"exact": sum(i["exact"] for i in items) / n if n else 0.0,
            "partial": sum(i["partial"] for i in items) / n if n else 0.0,
            "formatted": sum(i["formatted"] for i in items) / n if n else 0.0,
            "n": n}


def evaluate_records(model, tokenizer, records: list[dict], *, max_tokens: int = 512,
                     batch_size: int = 32, engine=None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Greedy-decode every record once; return (summary, per-item records)."""
    engine = engine or HFEngine(model, tokenizer, batch_size=batch_size, progress=progress)
    groups = engine.generate([messages_of(r) for r in records], 1, Sampling(temperature=0.0, max_tokens=max_tokens))
    items = []
    for r, (c,) in zip(records, groups):
        g = grade(c.text, r["letters"], r["answer"])
        items.append({**{k: v for k, v in r.items() if k != "messages"}, "completion": c.text, **g})
    return summarise(items), items


def evaluate_sets(model, tokenizer, sets: dict[int, list[dict]], **kw) -> tuple[dict[int, dict], list[dict]]:
    """Evaluate several held-out sets at once ({difficulty: records}); one generate pass for all."""
    flat = [r for d in sorted(sets) for r in sets[d]]
    _, items = evaluate_records(model, tokenizer, flat, **kw)
    by_d: dict[int, dict] = {}
    start = 0
    for d in sorted(sets):
        by_d[d] = summarise(items[start:start + len(sets[d])])
        start += len(sets[d])
    return by_d, items
