"""`picorl export`: a finished run folder becomes a results folder, nothing half-written."""
import json
from pathlib import Path

import pytest

from picorl import data, pipeline, report, run_records, session
from cli import main
from picorl.config import load_config
from picorl.faults import FaultInjected
from picorl.plan import chunks

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The smoke pipeline's steps, run directly; one eval fails once and is retried."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(SMOKE, [])
    session.clear_sessions()
    run_records.prepare_run_dir(cfg, run_dir)
    pipeline.build_data(cfg, run_dir)
    pipeline.run_sft(cfg, run_dir, progress=False)
    pipeline.run_eval(cfg, run_dir, 0, progress=False)
    for c in chunks(cfg):
        pipeline.run_chunk(cfg, run_dir, c, progress=False)
        if c.eval_after:
            if c.end == 2:
                mp = pytest.MonkeyPatch()
                mp.setenv("PICORL_FAULT", "eval:2")
                with pytest.raises(FaultInjected):
                    pipeline.run_eval(cfg, run_dir, c.end, progress=False)
                mp.undo()
            pipeline.run_eval(cfg, run_dir, c.end, progress=False)
    report.write_report(cfg, run_records.read_history(run_dir), run_records.eval_rows(run_dir), run_dir)
    session.clear_sessions()
    return run_dir


def test_export_holds_report_final_eval_adapter_and_timings(finished_run, tmp_path, capsys):
    out = tmp_path / "results" / "smoke"
    assert main(["export", "--run-dir", str(finished_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.yaml", "curves.png", "final_eval.jsonl",
                                                     "report.md", "run.json", "sft_adapter", "sft_eval.jsonl"]
    for a in ("adapter", "sft_adapter"):
        assert sorted(p.name for p in (out / a).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # The baseline is the run's own step 0: pruning keeps it, and the export ships it as it is.
    assert (out / "sft_adapter" / "adapter_model.safetensors").read_bytes() == (
        finished_run / "checkpoints" / "step_0" / "adapter" / "adapter_model.safetensors").read_bytes()
    last = json.loads((finished_run / "evals" / "step_4.json").read_text())
    items = data.read_jsonl(out / "final_eval.jsonl")
    assert len(items) == 3 * 4 and [i["completion"] for i in items] == [i["completion"] for i in last["items"]]
    assert {"difficulty", "string", "letters", "answer", "completion"} <= set(items[0])
    run = json.loads((out / "run.json").read_text())
    assert run["step"] == 4 and run["n"] == {"d3": 4, "d5": 4, "d6": 4}
    assert run["exact"]["d6"] == last["by_difficulty"]["6"]["exact"]
    first = json.loads((finished_run / "evals" / "step_0.json").read_text())
    sft_items = data.read_jsonl(out / "sft_eval.jsonl")
    assert [i["completion"] for i in sft_items] == [i["completion"] for i in first["items"]]
    for d in (3, 5, 6):  # gained and lost, counted here item by item
        pairs = [(b["exact"], a["exact"]) for b, a in zip(first["items"], last["items"]) if b["difficulty"] == d]
        change = run["change"][f"d{d}"]
        assert (change["gained"], change["lost"], change["n"]) == (
            sum(a > b for b, a in pairs), sum(a < b for b, a in pairs), 4)
        assert change["before"] == run["sft_exact"][f"d{d}"] == first["by_difficulty"][str(d)]["exact"]
        samples = [(b["sampled"], a["sampled"]) for b, a in zip(first["items"], last["items"]) if b["difficulty"] == d]
        assert (change["sampled"]["rose"], change["sampled"]["fell"]) == (  # smoke.yaml's eval.samples
            sum(a > b for b, a in samples), sum(a < b for b, a in samples))
    # Every step was timed on this machine, the failed eval try included.
    timings = run_records.read_timings(finished_run)
    assert [t["task"] for t in timings].count("grpo") == 2 and [t["ok"] for t in timings].count(False) == 1
    assert run["failed_tries"] == 1 and len(run["machines"]) == 1
    assert run["seconds"]["sft"] > 0 and run["seconds"]["grpo"] > 0
    assert run["training_minutes"] == round((run["seconds"]["sft"] + run["seconds"]["grpo"]) / 60, 2)
    assert json.loads(capsys.readouterr().out)["out"] == str(out)


def test_exported_adapter_loads_for_eval(finished_run, tmp_path):
    from picorl import models

    out = tmp_path / "exported"
    main(["export", "--run-dir", str(finished_run), "--out", str(out), "--step", "2"])
    assert json.loads((out / "run.json").read_text())["step"] == 2
    model, _ = models.load_model("tiny-random-llama", device="cpu", dtype="float32")
    assert hasattr(models.load_adapter(model, out / "adapter"), "peft_config")


def test_export_fresh_evaluates_the_adapter_on_strings_no_run_generated(finished_run, tmp_path):
    out = tmp_path / "with-fresh"
    assert main(["export", "--run-dir", str(finished_run), "--out", str(out), "--fresh", "3"]) == 0
    items = data.read_jsonl(out / "fresh_eval.jsonl")
    expected = [r for d in (3, 5, 6) for r in data.fresh_records(d, 3)]
    assert [(i["string"], i["letters"]) for i in items] == [(r["string"], r["letters"]) for r in expected]
    run = json.loads((out / "run.json").read_text())
    assert run["fresh_n"] == 3 and set(run["fresh_exact"]) == {"d3", "d5", "d6"}
    # The after-SFT adapter answers the same fresh items, so the two compare item by item.
    sft_items = data.read_jsonl(out / "sft_fresh_eval.jsonl")
    assert [(i["string"], i["letters"]) for i in sft_items] == [(i["string"], i["letters"]) for i in items]
    for d in (3, 5, 6):
        pairs = [(b["exact"], a["exact"]) for b, a in zip(sft_items, items) if b["difficulty"] == d]
        assert run["fresh_change"][f"d{d}"]["gained"] == sum(a > b for b, a in pairs)
        assert run["fresh_change"][f"d{d}"]["before"] == run["sft_fresh_exact"][f"d{d}"]
    assert run["fresh_exact"]["d3"] == sum(i["exact"] for i in items[:3]) / 3


@pytest.mark.parametrize("case,msg", [
    ("exists", "already exists"),
    ("step", "no eval of step 3; evaluated steps: [0, 2, 4]"),
    ("not a run", "has no evals/step_N.json"),
    ("fresh", "--fresh must be >= 0 items per difficulty, got -1"),
    ("fresh pool", "fresh items (distinct items of its tier outside the held-out set), asked for 200000"),
    ("inside", "is inside the run folder"),
])
def test_export_refuses_and_writes_nothing(finished_run, tmp_path, capsys, case, msg):
    out = tmp_path / "out"
    args = ["export", "--run-dir", str(finished_run), "--out", str(out)]
    if case == "exists":
        out.mkdir()
    elif case == "step":
        args += ["--step", "3"]
    elif case == "fresh":
        args += ["--fresh", "-1"]
    elif case == "fresh pool":  # more distinct words than the tier has: refused, not drawn forever
        args += ["--fresh", "200000"]
    elif case == "inside":  # an export inside its own run would become part of the run it copies
        args[4] = str(finished_run / "evals" / "copy")
    else:
        args[2] = str(tmp_path)
    assert main(args) == 2
    assert not (finished_run / "evals" / "copy").exists()
    assert msg in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if case == "exists" else [])


def test_a_terminated_export_leaves_no_temporary_folder(finished_run, tmp_path):
    """SIGTERM mid-export (a service manager, a closed terminal) ends it as Ctrl-C does: the
    hidden temporary folder is removed, nothing is left at --out, and the status says SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "results" / "smoke"
    out.parent.mkdir()
    marker = tmp_path / "hanging"
    env = {**os.environ, "PICORL_FAULT": "export:4:hang", "PICORL_FAULT_MARKER": str(marker)}
    p = subprocess.Popen([sys.executable, "-m", "cli", "export", "--run-dir", str(finished_run), "--out", str(out)],
                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), p.communicate()
    assert [x.name for x in out.parent.iterdir()][0].startswith(".smoke.")  # the temporary, mid-export
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and "picorl export: terminated" in err
    assert list(out.parent.iterdir()) == []
