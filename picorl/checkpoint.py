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

A checkpoint damaged after it was written (a truncated weights file, random bytes from a bad
disk, a torn state.json) is not listed: `checkpoint_damage` names the file and what is wrong
with it, a warning says so once, and a resume continues from the last sound checkpoint.
"""
from __future__ import annotations

import errno
import json
import pickle
import random
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import torch

from picorl.faults import fault_point
from picorl.files import atomic_folder, umask_mode

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def trained_weights(model) -> dict[str, torch.Tensor]:
    """A copy of the model's trainable tensors by parameter name (a LoRA adapter: a few MB)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trained_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (a trained_weights dict) into the model's parameters in place."""
    for n, p in model.named_parameters():
        if n in weights:
            p.copy_(weights[n])


def save_model_weights(model, folder: Path) -> None:
    if _is_peft(model):
        model.save_pretrained(folder / "adapter", safe_serialization=True)
        umask_mode(folder / "adapter" / "adapter_model.safetensors")  # safetensors writes it 0600
    else:
        from safetensors.torch import save_model
        save_model(model, str(folder / "model.safetensors"))
        umask_mode(folder / "model.safetensors")


def load_model_weights(model, folder: Path) -> None:
    f = folder / ("adapter/adapter_model.safetensors" if _is_peft(model) else "model.safetensors")
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {'adapter' if _is_peft(model) else 'model'} weights ({f})")
    device = str(next(model.parameters()).device)
    if _is_peft(model):
        load_adapter_file(model, f, device)
        return
    from safetensors.torch import load_model
    try:  # strict: a missing or extra tensor raises, as load_adapter_file's check does for an adapter
        load_model(model, str(f), device=device)
    except Exception as e:  # safetensors' own errors name no file
        raise CheckpointDamaged(f"cannot read {f}: {e}") from None


class AdapterMismatch(ValueError):
    """An adapter file whose LoRA weights are not the model's adapter's (other layers or modules)."""


def load_adapter_file(model, f: Path, device: str = "cpu") -> None:
    """Every LoRA weight of the peft adapter file `f` (adapter_model.safetensors) into the
    model's adapter, or AdapterMismatch naming a key. peft's set_peft_model_state_dict loads
    what matches and only reports the rest, so an adapter saved on other modules (say q_proj
    and v_proj where the model has seven) would leave the model half loaded and half at its
    seeded init, training or serving on without a word. Another rank fails in torch's copy
    (its size mismatch names the tensor)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    try:
        state = load_file(str(f), device=device)
    except Exception as e:  # safetensors' own errors name no file
        raise CheckpointDamaged(f"cannot read {f}: {e}") from None
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]  # the base weights are never in an adapter file
    if result.unexpected_keys or missing:
        raise AdapterMismatch(f"{f} is not this model's adapter: {len(result.unexpected_keys)} weights the model's "
                              f"adapter lacks ({result.unexpected_keys[:1]}), {len(missing)} of its weights not in "
                              f"the file ({missing[:1]}); was it saved with other model.lora settings?")


class CheckpointDamaged(RuntimeError):
    """A checkpoint file that cannot be what save_checkpoint wrote (truncated, overwritten, torn)."""


def _safetensors_damage(f: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None: an 8-byte little-endian header
    length, a JSON header, then exactly the bytes its tensors' offsets claim (no checksum exists,
    so flipped bytes inside tensor data are the one thing this cannot see)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"header length {n} but the file has {size} bytes (truncated or overwritten)"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "header is not JSON (overwritten)"
    if not isinstance(header, dict):
        return "header is not a JSON object (overwritten)"
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        return "header has no tensor offsets (overwritten)"
    if 8 + n + end != size:
        return f"header says {8 + n + end} bytes, the file has {size} (truncated or overwritten)"
    return None


def _json_damage(f: Path, lines: bool = False) -> str | None:
    try:
        text = f.read_text()
        rows = [x for x in text.splitlines() if x.strip()] if lines else [text]
        for n, row in enumerate(rows, start=1):
            if not isinstance(json.loads(row), dict):
                return f"line {n} is not a JSON object" if lines else "not a JSON object"
    except UnicodeDecodeError:
        return "not text (overwritten)"
    except ValueError as e:
        return f"{'line ' + str(n) + ': ' if lines else ''}not JSON ({e}; torn or overwritten)"
    return None


def _zip_damage(f: Path) -> str | None:
    """torch.save writes a zip archive with a CRC per member: a bad CRC or framing is damage."""
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a readable torch.save archive ({e}; truncated or overwritten)"
    return f"member {bad} fails its CRC check (overwritten)" if bad else None


_SOUND: dict[tuple, str | None] = {}  # (folder, each file's size and mtime) -> its damage


def checkpoint_damage(folder: str | Path) -> str | None:
    """Why checkpoint `folder` cannot be resumed from, naming the file, or None when it is sound.

    Reads each file once per version (size and mtime): the archive's CRCs cover the trainer
    state; the weights' framing and every JSON file are parsed."""
    folder = Path(folder)
    stats = [(str(p), p.stat()) for p in sorted(folder.rglob("*")) if p.is_file()]
    key = (str(folder), tuple((p, st.st_size, st.st_mtime_ns) for p, st in stats))
    if key not in _SOUND:
        _SOUND[key] = _damage(folder)
    return _SOUND[key]


def _damage(folder: Path) -> str | None:
    state = folder / "state.json"
    if not state.is_file():
        return "state.json missing"
    checks = [(state, _json_damage(state))]
    if not checks[0][1] and json.loads(state.read_text()).get("step") != int(folder.name.split("_")[-1]):
        return f"{state}: its step is not {folder.name}'s"
    history = folder / "history.jsonl"
    if history.is_file():
        checks.append((history, _json_damage(history, lines=True)))
    weights = [folder / "adapter" / "adapter_model.safetensors", folder / "model.safetensors"]
    if not any(w.is_file() for w in weights):
        return f"no weights ({weights[0].relative_to(folder)} or {weights[1].name})"
    checks += [(w, _safetensors_damage(w)) for w in weights if w.is_file()]
    if (folder / "adapter" / "adapter_config.json").is_file():
        checks.append((folder / "adapter" / "adapter_config.json", _json_damage(folder / "adapter" / "adapter_config.json")))
    ts = folder / "trainer_state.pt"
    checks.append((ts, _zip_damage(ts) if ts.is_file() else "missing"))
    return next((f"{f}: {why}" for f, why in checks if why), None)


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
                    keep_last: int | None = None, history: list[dict] | None = None) -> Path:
    """Write root/step_N atomically and prune older checkpoints beyond keep_last.

    `history` is the run's metric rows up to this step (read back with `read_history`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # A run folder has one writer: hidden leftovers are from a write that was killed.
    for stale in root.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = step_path(root, step)
    # replace: a retry rewriting the same step swaps the new copy in whole.
    with atomic_folder(final, replace=True, fsync=True) as tmp:
        try:
            save_model_weights(model, tmp)
            fault_point("checkpoint", step)
            torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
            if history is not None:
                (tmp / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
            (tmp / "state.json").write_text(json.dumps({"step": step, **(info or {})}, indent=2, default=str))
        except (OSError, RuntimeError) as e:
            # Checked while the half-written copy still fills the disk (it is removed on the way out).
            raise _disk_full(e, root, step) or e
    if keep_last:
        # step_0 (after SFT, before any GRPO update) is kept as well: it is the baseline every
        # later eval is compared with, and an export ships it beside the final adapter.
        for old in list_checkpoints(root)[:-keep_last]:
            if old.name != step_path(root, 0).name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(e: BaseException, root: Path, step: int) -> OSError | None:
    """The failed write as "no space left on <folder>" when that is what it was: torch.save on a
    full disk says only `unexpected pos 5120 vs 5014`."""
    free = shutil.disk_usage(root).free
    if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) and free >= 1 << 20:
        return None
    return OSError(errno.ENOSPC, f"No space left on the disk of {root} for checkpoint step_{step} "
                                 f"({free / 2**20:.1f} MiB free; the write said: {str(e).splitlines()[0][:200]}). "
                                 "The checkpoints before it are intact: free some space, then resume")


def read_info(folder: str | Path) -> dict:
    """A checkpoint's state.json: its step, phase, stage, curriculum state and extras."""
    return json.loads((Path(folder) / "state.json").read_text())


def read_history(folder: str | Path) -> list[dict]:
    """The metric rows saved with a checkpoint ([] for one saved without them)."""
    f = Path(folder) / "history.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def adapter_path(folder: str | Path) -> Path | None:
    """A checkpoint's LoRA adapter folder (loadable by peft), or None for a full fine-tune's."""
    p = Path(folder) / "adapter"
    return p if (p / "adapter_model.safetensors").is_file() else None


def copy_adapter(folder: str | Path, dst: Path) -> None:
    """The adapter of checkpoint `folder` into the new folder dst (its config and weights only)."""
    src = adapter_path(folder)
    if src is None:
        raise FileNotFoundError(f"no LoRA adapter in checkpoint {folder} (a full fine-tune?)")
    dst.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(src / name, dst / name)


def is_checkpoint(folder: str | Path) -> bool:
    """Whether a completed checkpoint is at `folder` (sound or not: see checkpoint_damage)."""
    return (Path(folder) / "state.json").is_file()


def step_path(root: str | Path, step: int) -> Path:
    """Where checkpoint `step` lives under root."""
    return Path(root) / f"step_{step}"


_WARNED: set[str] = set()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Sound checkpoints under root, oldest first. Temp folders are never listed; a damaged
    checkpoint is left out with a warning (once) naming its bad file, so a resume continues
    from the one before it and the rerun writes it again."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not ((m := _STEP_DIR.match(p.name)) and p.is_dir()):
            continue
        why = checkpoint_damage(p)
        if why is None:
            found.append((int(m.group(1)), p))
        elif why != "state.json missing" and why not in _WARNED:  # no state.json: never finished, not damaged
            _WARNED.add(why)
            print(f"warning: checkpoint {p} is damaged and skipped ({why}); training resumes from "
                  "the checkpoint before it", file=sys.stderr)
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
    if not is_checkpoint(folder):
        raise FileNotFoundError(f"not a checkpoint: {folder} (state.json missing)")
    if why := checkpoint_damage(folder):
        raise CheckpointDamaged(f"checkpoint {folder} is damaged: {why}")
    load_model_weights(model, folder)
    try:
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        # Only a sound archive gets here (its CRCs passed): what weights_only refused is a
        # pickled object, not damage.
        if allow_pickle:
            raise
        raise RuntimeError(f"{folder}/trainer_state.pt needs unpickling arbitrary objects; refused "
                           f"(pass allow_pickle=True only for checkpoints you trust): {e}") from None
    set_rng_state(state.pop("rng"))
    return state, read_info(folder)
