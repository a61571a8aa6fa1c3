"""Save and restore the whole trainer state, atomically.

A checkpoint is a folder `step_N/`:
    adapter/              the LoRA adapter (adapter_config.json + adapter_model.safetensors),
    model.safetensors     or the full weights when training without LoRA
    trainer_state.pt      optimizer, scheduler, RNG states, step counters (tensors and plain
                          values only: loaded with torch.load(weights_only=True))
    state.json            the human-readable part: step, phase, curriculum state, extras

It is written into a hidden temp folder beside its final place, flushed, then renamed, so a
crash or a full disk mid-write leaves the previous checkpoint as it was. Old checkpoints are
pruned only after the new one is in place.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from picorl.faults import fault_point
from picorl.files import atomic_folder

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_model_weights(model, folder: Path) -> None:
    if _is_peft(model):
        model.save_pretrained(folder / "adapter", safe_serialization=True)
    else:
        from safetensors.torch import save_model
        save_model(model, str(folder / "model.safetensors"))


def load_model_weights(model, folder: Path) -> None:
    if _is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        f = folder / "adapter" / "adapter_model.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no adapter weights ({f})")
        set_peft_model_state_dict(model, load_file(str(f), device=str(next(model.parameters()).device)))
    else:
        from safetensors.torch import load_model
        load_model(model, str(folder / "model.safetensors"), device=str(next(model.parameters()).device))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model, trainer_state: dict, info: dict | None = None,
                    keep_last: int | None = None, files: dict[str, str] | None = None) -> Path:
    """Write root/step_N atomically and prune older checkpoints beyond keep_last.

    `files` maps extra file names to text written inside the checkpoint (e.g. the metric history).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # A run folder has one writer: hidden leftovers are from a write that was killed.
    for stale in root.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = step_path(root, step)
    # replace: a retry rewriting the same step swaps the new copy in whole.
    with atomic_folder(final, replace=True, fsync=True) as tmp:
        save_model_weights(model, tmp)
        fault_point("checkpoint", step)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "state.json").write_text(json.dumps({"step": step, **(info or {})}, indent=2, default=str))
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def step_path(root: str | Path, step: int) -> Path:
    """Where checkpoint `step` lives under root."""
    return Path(root) / f"step_{step}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (temp folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(folder: str | Path, model, allow_pickle: bool = False) -> tuple[dict, dict]:
    """Restore model weights and RNG states; return (trainer_state, info) for the caller to apply.

    trainer_state.pt is read with weights_only=True (tensors and plain values); a checkpoint
    that needs arbitrary unpickling is refused unless allow_pickle is set.
    """
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"not a checkpoint: {folder} (state.json missing)")
    load_model_weights(model, folder)
    try:
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        if allow_pickle:
            raise
        raise RuntimeError(f"{folder}/trainer_state.pt needs unpickling arbitrary objects; refused "
                           f"(pass allow_pickle=True only for checkpoints you trust): {e}") from None
    set_rng_state(state.pop("rng"))
    info = json.loads((folder / "state.json").read_text())
    return state, info
