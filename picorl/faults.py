"""Fault injection for tests: make the pipeline fail at a named point, on purpose.

Armed by environment variables, so a test can arm a subprocess it is about to kill:
    PICORL_FAULT="update:3"          raise FaultInjected after update 3 (before its checkpoint)
    PICORL_FAULT="checkpoint:4:kill" SIGKILL this process while checkpoint step_4 is being written
    PICORL_FAULT="update:1:hang"     stop after update 1 until a signal arrives (to test signals mid-run)
    PICORL_FAULT_MARKER=/tmp/fired   fire only once: the marker file is created when it fires,
                                     and an existing marker disarms the fault (so a retry succeeds)
Points: sft (after SFT step N), rollout (after the rollouts of update N), update (after update N), checkpoint (mid-write of step_N),
eval (before eval at step N), log (before logging rows of step N), export (once the adapter of step N
is copied into the export's temporary folder).
Unarmed, `fault_point` is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


class FaultInjected(RuntimeError):
    """Raised at an armed fault point."""


def fault_point(name: str, step: int) -> None:
    spec = os.environ.get("PICORL_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != name or int(parts[1]) != step:
        return
    marker = os.environ.get("PICORL_FAULT_MARKER")
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text(spec)
    if len(parts) > 2 and parts[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if len(parts) > 2 and parts[2] == "hang":
        signal.pause()
    raise FaultInjected(f"injected fault at {name} step {step}")
