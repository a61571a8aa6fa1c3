"""The name of the machine a figure was measured on: the GPU's, else the CPU model and cores."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU model from /proc/cpuinfo (or the text given), else the architecture.

    A virtual machine may name its CPU without a model number: "AMD EPYC" is a Zen 3 with AVX2
    (family 25) or a Zen 5 with AVX512-BF16 (family 26), and a GRPO update of `make train`
    took 21.0 s on the first, 7.4 s on the second. So a name holding no digit gets the CPU's
    family and model: "AMD EPYC (family 25 model 1)"."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    name = fields.get("model name")
    if not name:
        return platform.machine()
    if not any(ch.isdigit() for ch in name) and fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def machine_name() -> str:
    """The GPU's name, else the CPU model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} x{os.cpu_count()}"
