"""What every benchmark shares: the machine's name and where its result file goes."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine() -> str:
    """The GPU's name, else the CPU model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} x{os.cpu_count()}"


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
