"""Greedy evaluation on fixed held-out sets, with sampled accuracy and pass@k beside it.

    summary, items = evaluate_records(model, tokenizer, records)
    summary == {"exact": 0.91, "partial": 0.97, "formatted": 1.0, "n": 128}
    summary, items = evaluate_records(model, tokenizer, records, samples=4)
    summary == {..., "sampled": 0.62, "pass_at_k": 0.85}

Each item repeats its input record and adds the completion, the parsed prediction and its
grade (and, with samples, the fraction of its samples exactly right), so an eval table can be
read line by line.

Why sampled figures beside greedy: GRPO trains the sampled policy. It first sharpens the
samples toward answers the model already gives, and the greedy answer moves only on items
where the samples come to beat it; an item whose samples go from 1 of 4 right to 3 of 4 has
not changed greedily yet. Sampled accuracy sees that move, pass@k says whether the model can
reach the answer at all.
"""
from __future__ import annotations

import math

from picorl.checkpoint import rng_state, set_rng_state
from picorl.data import messages_of
from picorl.envs import default_env
from picorl.rollout import Sampling
from picorl.session import build_engine


# The fields an eval adds to its record: the completion, the parsed prediction and its grade.
GRADE_FIELDS = ("completion", "prediction", "exact", "partial", "formatted")
# With samples: the fraction of the item's samples (at the rollout temperature) exactly right.
SAMPLED = "sampled"
# Where the environment reads working (Environment.follows_working): 1 when the answer is exact
# and is what its own chain derived. Letter counting: "<think>b a1 n a2 a3</think>" answering
# {"a": 3} for "banaa" is reasoned; the same answer after a chain that tallied a2 is exact only.
REASONED = "reasoned"


def item_fields(items: list[dict]) -> list[str]:
    """The fields of eval items that their tables keep (the export's JSONL, MLflow's table): the
    record's fields as the environment wrote them (letter counting: difficulty, string, letters,
    answer), then GRADE_FIELDS (then REASONED where the environment reads working, SAMPLED
    when the eval sampled)."""
    if not items:
        return list(GRADE_FIELDS)
    return list(item_of(items[0])) + list(GRADE_FIELDS) + [f for f in (REASONED, SAMPLED) if f in items[0]]


def item_of(item: dict) -> dict:
    """An eval item's record fields alone: what makes two evals' items the same item."""
    return {k: v for k, v in item.items() if k not in GRADE_FIELDS and k not in (REASONED, SAMPLED, "messages")}


def summarise(items: list[dict]) -> dict:
    """Means over the items; `reasoned` where the environment reads working; with samples also
    `sampled` (the mean fraction of samples right) and `pass_at_k` (the fraction of items with
    at least one right sample)."""
    n = len(items)
    out = {"exact": sum(i["exact"] for i in items) / n if n else 0.0,
           "partial": sum(i["partial"] for i in items) / n if n else 0.0,
           "formatted": sum(i["formatted"] for i in items) / n if n else 0.0,
           "n": n}
    if n and all(REASONED in i for i in items):
        out["reasoned"] = sum(i[REASONED] for i in items) / n
    if n and all(SAMPLED in i for i in items):
        out.update(sampled_figures([i[SAMPLED] for i in items]))
    return out


def sampled_figures(fractions: list[float]) -> dict:
    """Sampled accuracy (the mean fraction of samples right) and pass@k (the fraction of items
    with a right sample) of per-item fractions: [0, 0.25, 1] -> sampled 0.417, pass_at_k 0.667."""
    n = len(fractions)
    return {"sampled": sum(fractions) / n, "pass_at_k": sum(1 for f in fractions if f > 0) / n}


def sample_records(engine, records: list[dict], k: int, *, temperature: float, max_tokens: int, seed: int,
                   env=None) -> list[float]:
    """k samples of every record at `temperature`; per record the fraction exactly right.
    Seeded, so two evals of one set draw from the same random stream; the engines seed torch's
    global generator, which is put back after, so an eval changes nothing training draws next."""
    env = env or default_env()
    state = rng_state()
    try:
        groups = engine.generate([messages_of(r, env) for r in records], k,
                                 Sampling(temperature=temperature, max_tokens=max_tokens, seed=seed))
    finally:
        set_rng_state(state)
    return [sum(float(env.grade(c.text, r).exact) for c in grp) / k for r, grp in zip(records, groups)]


def evaluate_records(model, tokenizer, records: list[dict], *, max_tokens: int = 512,
                     batch_size: int = 32, engine=None, progress: bool = True, env=None, samples: int = 0,
                     sampling_engine=None, temperature: float = 1.0, seed: int = 0) -> tuple[dict, list[dict]]:
    """Greedy-decode every record once; return (summary, per-item records), graded by `env`
    (letter counting when left out). With `samples` > 0 each record is also sampled that many
    times at `temperature` (through `sampling_engine`, the greedy engine when left out) and
    its item gets SAMPLED."""
    env = env or default_env()
    if engine is None:
        engine = build_engine("hf", model, tokenizer, batch_size=batch_size, progress=progress)
    groups = engine.generate([messages_of(r, env) for r in records], 1,
                             Sampling(temperature=0.0, max_tokens=max_tokens))
    items = []
    for r, (c,) in zip(records, groups):
        item = {**{k: v for k, v in r.items() if k != "messages"}, "completion": c.text,
                **env.grade(c.text, r).as_item()}
        if (follows := env.follows_working(c.text, r)) is not None:
            item[REASONED] = float(bool(item["exact"]) and follows)
        items.append(item)
    if samples:
        fractions = sample_records(sampling_engine or engine, records, samples, temperature=temperature,
                                   max_tokens=max_tokens, seed=seed, env=env)
        for item, f in zip(items, fractions):
            item[SAMPLED] = f
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


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test of `gained` items against `lost` (ties, items that did not
    change, carry no information and are left out): P(a split at least this uneven | each
    changed item as likely to go either way). 41 gained against 7 lost: p = 6e-7; 5 against 4: p = 1.
    """
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def changes_by_difficulty(before: list[dict], after: list[dict], *, matched_only: bool = False) -> dict[int, dict]:
    """paired_change of each difficulty's items, for two evals of the same items: {3: {...}}.
    matched_only leaves out a difficulty whose item counts differ (an eval size changed
    between the two) instead of refusing it."""
    out = {}
    for d in sorted({i["difficulty"] for i in before}):
        b = [i for i in before if i["difficulty"] == d]
        a = [i for i in after if i["difficulty"] == d]
        if not matched_only or len(a) == len(b):
            out[d] = paired_change(b, a)
    return out


def paired_change(before: list[dict], after: list[dict]) -> dict:
    """Exact before -> after on the same items, the items gained and lost, and the sign test's p.

    Items are matched by position and must be the same items (same record fields): a
    held-out set is fixed, so two evals of it can be compared item by item, which a single
    accuracy cannot (on 128 items two equivalent runs disagree on some 40).
    """
    if len(before) != len(after):
        raise ValueError(f"the two evals hold {len(before)} and {len(after)} items; compare evals of one set")
    for i, (b, a) in enumerate(zip(before, after)):
        if item_of(b) != item_of(a):
            raise ValueError(f"item {i} differs between the evals ({str(item_of(b))[:80]} vs {str(item_of(a))[:80]})")
    gained = sum(1 for b, a in zip(before, after) if a["exact"] > b["exact"])
    lost = sum(1 for b, a in zip(before, after) if a["exact"] < b["exact"])
    n = len(before)
    out = {"n": n, "before": sum(b["exact"] for b in before) / n if n else 0.0,
           "after": sum(a["exact"] for a in after) / n if n else 0.0,
           "gained": gained, "lost": lost, "p_value": sign_test(gained, lost)}
    if n and all(REASONED in i for i in before + after):
        out["reasoned"] = reasoned_change(before, after)
    if n and all(SAMPLED in i for i in before + after):
        out["sampled"] = sampled_change(before, after)
    return out


def reasoned_change(before: list[dict], after: list[dict]) -> dict:
    """The reasoned fraction before -> after on the same items (matched as paired_change matches
    them), the items that became and stopped being reasoned, and the sign test of that pair.
    Beside the exact change it says whether GRPO's gain was in answers that follow their working:
    exact 25% -> 35% while reasoned 14% -> 4% is a model that learnt to guess."""
    gained = sum(1 for b, a in zip(before, after) if a[REASONED] > b[REASONED])
    lost = sum(1 for b, a in zip(before, after) if a[REASONED] < b[REASONED])
    n = len(before)
    return {"before": sum(i[REASONED] for i in before) / n, "after": sum(i[REASONED] for i in after) / n,
            "gained": gained, "lost": lost, "p_value": sign_test(gained, lost)}


def sampled_change(before: list[dict], after: list[dict]) -> dict:
    """Sampled accuracy and pass@k before -> after on the same items (matched as paired_change
    matches them), the items whose fraction of right samples rose and fell, and the sign test of
    that pair: an item that went from 1 of 4 samples right to 3 of 4 rose, whatever greedy did."""
    rose = sum(1 for b, a in zip(before, after) if a[SAMPLED] > b[SAMPLED])
    fell = sum(1 for b, a in zip(before, after) if a[SAMPLED] < b[SAMPLED])
    b, a = (sampled_figures([i[SAMPLED] for i in its]) for its in (before, after))
    return {"before": b["sampled"], "after": a["sampled"], "rose": rose, "fell": fell,
            "p_value": sign_test(rose, fell), "pass_before": b["pass_at_k"], "pass_after": a["pass_at_k"]}
