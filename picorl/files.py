"""Writing files and folders so that a reader sees the old version or the new, never half of one.

Both write into a private temporary beside the target and rename it into place: a rename
within one folder is atomic, so a crash, a full disk or a kill mid-write leaves the target
as it was and only a hidden temporary behind (removed on the way out where Python still runs).

    atomic_write_text("run/config.yaml", text)
    with atomic_folder("run/checkpoints/step_4", replace=True) as tmp:
        save_weights(tmp)          # tmp becomes step_4 when the block ends without an error
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(path: str | Path) -> None:
    """Give a file the mode `open` would have given it (0666 less the umask): for files that a
    library wrote through a private temporary (safetensors' are 0600), so that whoever may
    read the folder may read them."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically; a replaced file keeps its mode, a new one gets the umask's."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OSError(f"cannot write {path}: folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        # mkstemp makes the file 0600; a replaced file keeps its mode, a new one gets the umask's.
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, replace: bool = False, lost_race_ok: bool = False, fsync: bool = False):
    """Yield a temporary folder that becomes `target` when the block ends without an error.

    replace: an existing target is swapped out whole (its old copy removed afterwards);
        otherwise an existing target is an error (FileExistsError).
    lost_race_ok: if another process made `target` first, keep theirs and drop ours (for
        caches that several processes may fill at once with the same content).
    fsync: flush every file to disk before the rename (checkpoints must survive power loss).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        # mkdtemp makes the folder 0700: the finished one gets the umask's mode, as mkdir would
        # give it, so that a team reading checkpoints on shared storage can open them.
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        if target.exists() and replace:
            old = target.parent / f".{target.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, target)  # fails when target exists (a non-empty folder): never replaced silently
        except OSError:
            if not (lost_race_ok and target.exists()):
                if target.exists():
                    raise FileExistsError(f"{target} already exists") from None
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
