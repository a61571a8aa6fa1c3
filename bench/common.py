"""What every benchmark shares: the machine's name and where its result file goes."""
from __future__ import annotations

import json
from pathlib import Path

from picorl.files import atomic_write_text
from picorl.machine import cpu_name, machine_name as machine  # noqa: F401 (the benches import them from here)

RESULTS = Path(__file__).resolve().parent / "results"


def machine_tag(name: str) -> str:
    """A file-name-safe short form of a machine name."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


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
