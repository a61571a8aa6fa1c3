"""Metric names, built and read back in one place.

An eval row's metrics are named `eval/<kind>_d<difficulty>`: `eval/acc_d3` is the exact
accuracy of the greedy eval at difficulty (tier) 3, `eval/partial_d3` the mean fraction right
(the environment's partial credit: letters counted right, digits in place), `eval/format_d3` the fraction of answers in the asked format;
where the environment reads working, `eval/reasoned_d3` the fraction exactly right with the
answer its own chain derived (picorl.evaluate.REASONED); with eval.samples, `eval/sampled_d3` the mean fraction of samples exactly right and
`eval/pass_d3` pass@k. MLflow, the report and the benchmarks all read these names, so they
are spelled here only.

    eval_metrics({3: {"exact": 0.5, "partial": 0.75, "formatted": 1.0, "n": 4}})
    -> {"eval/acc_d3": 0.5, "eval/partial_d3": 0.75, "eval/format_d3": 1.0}
    eval_difficulties([{"metrics": {"eval/acc_d3": 0.5, "eval/acc_d10": 0.1}}])  -> [3, 10]
"""
from __future__ import annotations

import re

# kind in a metric name -> the key of an eval summary (picorl.evaluate.summarise)
EVAL_KINDS = {"acc": "exact", "partial": "partial", "format": "formatted", "reasoned": "reasoned",
              "sampled": "sampled", "pass": "pass_at_k"}
_EVAL = re.compile(r"^eval/(acc|partial|format|reasoned|sampled|pass)_d(\d+)$")


def eval_metric(kind: str, difficulty) -> str:
    if kind not in EVAL_KINDS:
        raise ValueError(f"eval metric kind {kind!r}: expected one of {sorted(EVAL_KINDS)}")
    return f"eval/{kind}_d{difficulty}"


def eval_metrics(by_difficulty: dict) -> dict[str, float]:
    """An eval's per-difficulty summaries as metrics (the sampled ones where the eval sampled)."""
    return {eval_metric(kind, d): s[field] for d, s in by_difficulty.items() for kind, field in EVAL_KINDS.items()
            if field in s}


def parse_eval_metric(name: str) -> tuple[str, int] | None:
    """("acc", 3) for "eval/acc_d3"; None for a name that is not an eval metric."""
    m = _EVAL.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def eval_difficulties(rows: list[dict], kind: str = "acc") -> list[int]:
    """The difficulties that rows' metrics hold an eval figure of `kind` for, in order."""
    found = {p[1] for r in rows for k in r["metrics"] if (p := parse_eval_metric(k)) and p[0] == kind}
    return sorted(found)
