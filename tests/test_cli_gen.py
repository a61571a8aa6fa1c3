import json
import subprocess
import sys

import pytest

from cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)


def test_gen_writes_records(tmp_path, capsys):
    out = tmp_path / "d3.jsonl"
    assert main(["gen", "--difficulty", "3", "--n", "25", "--seed", "5", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 25
    for r in lines:
        assert {"difficulty", "string", "letters", "answer", "messages"} <= set(r)
        assert r["answer"] == {c: r["string"].count(c) for c in r["letters"]}
    assert json.loads(capsys.readouterr().out)["n"] == 25


def test_gen_fresh_split_writes_the_fresh_set(tmp_path, capsys):
    from picorl import data

    out = tmp_path / "d6-fresh.jsonl"
    assert main(["gen", "--split", "fresh", "--difficulty", "6", "--n", "8", "--seed", "2", "--out", str(out)]) == 0
    assert data.read_jsonl(out) == data.fresh_records(6, 8, seed=2)
    assert json.loads(capsys.readouterr().out)["split"] == "fresh"


@pytest.mark.parametrize("args,msg", [
    (["--difficulty", "11", "--n", "5"], "difficulty must be an integer in 1-10, got 11"),
    (["--difficulty", "0", "--n", "5"], "got 0"),
    (["--difficulty", "3", "--n", "0"], "n must be an integer >= 1, got 0"),
    (["--difficulty", "5", "--n", "13000", "--split", "fresh"], "d5 can give at most 11702 fresh items"),
])
def test_gen_rejects_bad_values_and_writes_nothing(tmp_path, args, msg):
    out = tmp_path / "x.jsonl"
    r = run_cli("gen", *args, "--out", str(out))
    assert r.returncode != 0
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_gen_unwritable_path_fails_cleanly(tmp_path):
    out = tmp_path / "missing-dir" / "x.jsonl"
    r = run_cli("gen", "--difficulty", "2", "--n", "3", "--out", str(out))
    assert r.returncode != 0 and "missing-dir" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_gen_refuses_an_existing_file_unless_forced_and_keeps_its_mode(tmp_path):
    import os
    out = tmp_path / "d.jsonl"
    out.write_text("keep me\n")
    os.chmod(out, 0o644)
    r = run_cli("gen", "--difficulty", "2", "--n", "3", "--out", str(out))
    assert r.returncode == 2 and "exists; pass --force to replace it" in r.stderr
    assert out.read_text() == "keep me\n"
    r = run_cli("gen", "--difficulty", "2", "--n", "3", "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 3 and (out.stat().st_mode & 0o777) == 0o644


def test_a_new_output_file_gets_the_umask_mode_not_0600(tmp_path):
    import os
    out = tmp_path / "new.jsonl"
    mask = os.umask(0o022)
    try:
        assert main(["gen", "--difficulty", "2", "--n", "2", "--out", str(out)]) == 0
    finally:
        os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder", "device"])
def test_gen_never_replaces_what_is_not_a_regular_file(tmp_path, kind):
    import os
    import stat
    target = tmp_path / "target.jsonl"
    target.write_text("linked\n")
    out = tmp_path / "out"
    if kind == "symlink":
        out.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "folder":
        out.mkdir()
    else:
        out = "/dev/null"
    r = run_cli("gen", "--difficulty", "2", "--n", "3", "--out", str(out), "--force")
    assert r.returncode == 2 and "write to a new file path" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert target.read_text() == "linked\n"
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(out).st_mode)
    if kind == "device":
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
