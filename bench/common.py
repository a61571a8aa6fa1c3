"""What every benchmark shares: the machine's name and where its result file goes."""
from __future__ import annotations

import json
from pathlib import Path

from picorl.machine import cpu_name, machine_name as machine  # noqa: F401 (the benches import them from here)

RESULTS = Path(__file__).resolve().parent / "results"


def machine_tag(name: str) -> str:
    """A file-name-safe short form of a machine name."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


def write_result(stem: str, out: dict) -> Path:
    """Write bench/results/<stem>.json and say so."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote bench/results/{path.name}")
    return path
