"""The benchmark scripts run end to end (on the tiny model), so their figures stay honest."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.update import PARTS, add_shape_args, bench_reward_value, jitter, run_picorl

ROOT = Path(__file__).resolve().parents[1]


def shape(*argv):
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    return ap.parse_args(["--model", "tiny-random-llama", "--tasks", "2", "--k", "4", "--micro-batch", "4",
                          "--max-tokens", "6", *argv])


def test_bench_reward_is_the_partial_reward_plus_a_small_fixed_jitter():
    right = '<answer>{"a": 1, "b": 2}</answer>'
    assert bench_reward_value(right, ["a", "b"], {"a": 1, "b": 2}) == pytest.approx(1.0 + jitter(right))
    assert 0 <= jitter("x") < 0.01 and jitter("x") == jitter("x") != jitter("y")


@pytest.mark.parametrize("engine", ["hf", "graph"])
def test_update_bench_splits_every_update(tokenizer, engine):
    res = run_picorl(shape("--updates", "2", "--engine", engine))
    med = res["median"]
    assert set(PARTS) <= set(med)
    assert med["loss_backward_s"] > 0 and sum(med[k] for k in PARTS[:-1]) <= med["update_s"] * 1.001
    assert med["rollout_tokens"] == pytest.approx(2 * 4 * med["completion_len"])
    assert res["peak_memory_gb"] > 0


@pytest.mark.slow
def test_vs_trl_runs_both_trainers_side_by_side():
    out = subprocess.run([sys.executable, "-m", "bench.vs_trl", "--model", "tiny-random-llama", "--tasks", "2",
                          "--k", "4", "--micro-batch", "4", "--max-tokens", "6", "--updates", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| picorl") or line.startswith("| trl")]
    assert len(table) == 2, out.stdout
    for line in table:
        s_per_update = float(line.split("|")[2])
        assert s_per_update > 0
    assert "faster per update than TRL" in out.stdout
    assert not list((ROOT / "bench" / "results").glob("vs_trl-*2x4x6*"))  # smoke runs write no result


def test_readme_bench_tables_are_built_from_the_result_files():
    from bench.table import markdown
    assert markdown() in (ROOT / "README.md").read_text(), "stale: run python -m bench.table --write"


def test_sft_recipe_keeps_rows_of_the_same_configuration_only(tmp_path):
    from bench.sft_recipe import earlier_rows

    path = tmp_path / "sft.json"
    old = {"machine": "m", "config": {"steps": 200}, "rows": {"base": {"x": 1}, "cot": {"x": 2}}}
    path.write_text(json.dumps(old))
    assert earlier_rows(path, {"machine": "m", "config": {"steps": 200}}, {"cot"}) == {"base": {"x": 1}}
    assert earlier_rows(path, {"machine": "m", "config": {"steps": 400}}, {"cot"}) == {}
    assert earlier_rows(path, {"machine": "other", "config": {"steps": 200}}, set()) == {}
    assert earlier_rows(tmp_path / "none.json", old, set()) == {}
