"""What every benchmark shares: the machine's name and where its result file goes."""
from __future__ import annotations

import json
from pathlib import Path

from picorl.files import atomic_write_text
from picorl.machine import cpu_name, machine_name as machine  # noqa: F401 (the benches import them from here)

RESULTS = Path(__file__).resolve().parent / "results"


def machine_tag(name: str) -> str:
    """A file-name-safe short form of a machine name."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:60]


def write_result(stem: str, out: dict, folder: Path = RESULTS) -> Path:
    """Write <folder>/<stem>.json (bench/results/ unless told otherwise), atomically, and say so."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    atomic_write_text(path, json.dumps(out, indent=2))
    print(f"wrote {'bench/results' if folder == RESULTS else folder}/{path.name}")
    return path


def earlier_rows(path: Path, out: dict, rerun: set) -> dict:
    """Rows of an earlier run of the same configuration on the same machine that this run did not redo.

    A row can take a quarter of an hour on a CPU, so adding a row (--styles cot_tokens,
    --runs full_ft) keeps the rows already measured instead of overwriting them.
    """
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if old.get("config") != out["config"] or old.get("machine") != out["machine"]:
        return {}
    return {k: v for k, v in old["rows"].items() if k not in rerun}


def profile_top(run, top: int) -> dict:
    """Run `run()` once under torch.profiler; its `top` operators by their own time on the device
    that does the work (the GPU's kernels where there is one, else the CPU's), and two totals.

    wall_ms against busy_ms says what bounds the work. On a GPU, busy_ms is the sum of every
    kernel's time: 5,290 ms of wall against 900 ms busy means the GPU idles 83% of the time,
    waiting on Python and kernel launches, and fewer, larger kernels would help more than
    faster ones. On a CPU the ops' own times add up to about the wall.
    """
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return {"device": "cuda" if cuda else "cpu", "wall_ms": round(1e3 * wall, 1),
            "busy_ms": round(sum(getattr(e, key) for e in events) / 1e3, 1),
            "ops": [{"op": e.key, "self_ms": round(getattr(e, key) / 1e3, 2), "calls": e.count} for e in rows]}


def print_profile(what: str, prof: dict) -> None:
    busy = prof["busy_ms"] / max(prof["wall_ms"], 1e-9)
    print(f"{what}, profiled: {prof['wall_ms']:.0f} ms of wall, the {prof['device']} busy {prof['busy_ms']:.0f} ms "
          f"({busy:.0%})")
    print("| operator | self ms | calls |")
    print("|---|---|---|")
    for row in prof["ops"]:
        print(f"| `{row['op'][:70]}` | {row['self_ms']:.1f} | {row['calls']} |")
