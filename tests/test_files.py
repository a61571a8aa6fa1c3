"""picorl/files.py: a target is the old version or the new, never half of one."""
import pytest

from picorl.files import atomic_folder, atomic_write_text


def test_a_failed_block_leaves_the_target_as_it_was_and_no_temporary(tmp_path):
    target = tmp_path / "step_1"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_folder(target, replace=True) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("mid-write")
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


def test_replace_swaps_the_whole_folder(tmp_path):
    target = tmp_path / "step_1"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic_folder(target, replace=True, fsync=True) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


def test_an_existing_target_is_never_replaced_silently(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("new")
    assert (target / "keep").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_a_lost_race_keeps_the_winners_copy(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target, lost_race_ok=True) as tmp:
        (tmp / "config.json").write_text("ours")
        target.mkdir()  # another process finished first
        (target / "config.json").write_text("theirs")
    assert (target / "config.json").read_text() == "theirs" and len(list(tmp_path.iterdir())) == 1


def test_atomic_write_text_needs_the_folder(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        atomic_write_text(tmp_path / "missing" / "x.txt", "x")
    assert atomic_write_text(tmp_path / "x.txt", "x").read_text() == "x"


def test_a_torn_timings_line_loses_only_itself(tmp_path, capsys):
    """A crash mid-append leaves a torn last line: the next row starts a line of its own, and
    reading skips the torn one, naming the file and line, and keeps every intact row."""
    import json

    from picorl.run_records import read_timings, timed
    from picorl.run_folder import RunFolder
    path = RunFolder(tmp_path).timings
    path.write_text(json.dumps({"task": "sft", "seconds": 1.0}) + "\n" + '{"task": "grpo", "seco')
    with timed(tmp_path, "eval", step=0):
        pass
    rows = read_timings(tmp_path)
    assert [r["task"] for r in rows] == ["sft", "eval"]
    assert f"{path}:2 is not a JSON row" in capsys.readouterr().err


def test_a_finished_folder_and_file_get_the_umask_s_mode_not_a_temporary_s(tmp_path):
    """mkdtemp and mkstemp make 0700 folders and 0600 files; what they become must read as
    mkdir and open would make it (here umask 022: 0755 and 0644)."""
    import os
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "ckpt") as tmp:
            (tmp / "weights").write_bytes(b"x")
        atomic_write_text(tmp_path / "state.json", "{}")
    finally:
        os.umask(old)
    assert oct((tmp_path / "ckpt").stat().st_mode & 0o777) == oct(0o755)
    assert oct((tmp_path / "ckpt" / "weights").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "state.json").stat().st_mode & 0o777) == oct(0o644)
