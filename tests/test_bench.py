"""The benchmark scripts run end to end (on the tiny model), so their figures stay honest."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    # One update after the first: its parts are stretches of its wall time, each figure rounded
    # to 1 ms, so the parts' sum may pass the total by half a millisecond per figure.
    assert med["loss_backward_s"] > 0 and sum(med[k] for k in PARTS[:-1]) <= med["update_s"] + 0.0005 * len(PARTS)
    assert med["rollout_tokens"] == pytest.approx(2 * 4 * med["completion_len"])
    assert res["peak_memory_gb"] > 0


def check_profile(prof: dict, top: int) -> None:
    ops = prof["ops"]
    assert len(ops) == top and all(r["self_ms"] >= 0 and r["calls"] >= 1 for r in ops)
    assert [r["self_ms"] for r in ops] == sorted((r["self_ms"] for r in ops), reverse=True)
    assert any(r["op"] in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear") for r in ops)  # the matmuls show
    # The listed ops are part of the busy time, which the profiled ops' own times make up.
    assert sum(r["self_ms"] for r in ops) <= prof["busy_ms"] + 0.1 * top  # each figure rounded to 0.05 ms
    assert prof["wall_ms"] > 0 and prof["device"] == "cpu"


def test_update_bench_profiles_one_more_update_when_asked(tokenizer):
    check_profile(run_picorl(shape("--updates", "1", "--engine", "graph", "--profile", "5"))["profile"], 5)


def test_sft_bench_profiles_steps_without_the_tokenizing(tokenizer):
    from bench.sft_speed import profile_sft_steps
    from picorl import data, models
    from picorl.sft import encode_records
    model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=4, alpha=8)
    examples = encode_records(tokenizer, data.train_records(2, 6, seed=0), "cot", progress=False)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    prof = profile_sft_steps(model, tokenizer, examples, argparse.Namespace(batch_size=3, profile=6), range(2))
    check_profile(prof, 6)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the profiled steps trained


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
    from bench.table import headline_markdown, markdown
    assert markdown() in (ROOT / "docs" / "benchmarks.md").read_text(), "stale: run python -m bench.table --write"
    assert headline_markdown() in (ROOT / "README.md").read_text(), "stale headline: run python -m bench.table --write"


def test_headline_has_a_row_per_exported_run_beside_the_reference(tmp_path):
    from bench.table import headline_rows
    from picorl.config import Config, to_dict
    from picorl.export import time_summary
    import yaml

    run = tmp_path / "2026-12-01-smollm2-curriculum"
    run.mkdir()
    cfg = to_dict(Config())
    cfg["sft"].update(steps=300, batch_size=64)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    timings = [{"task": "sft", "seconds": 150.0, "ok": True, "machine": "NVIDIA H100 80GB HBM3"},
               {"task": "grpo", "seconds": 270.0, "ok": True, "machine": "NVIDIA H100 80GB HBM3"},
               {"task": "grpo", "seconds": 12.0, "ok": False, "machine": "NVIDIA H100 80GB HBM3"}]
    summary = {"step": 50, "exact": {"d3": 0.96875, "d5": 0.9375, "d6": 0.90625}, "n": {"d3": 128},
               **time_summary(timings), "fresh_exact": {"d3": 0.953125, "d5": 0.9453125, "d6": 0.8984375},
               "fresh_n": 128}
    (run / "run.json").write_text(json.dumps(summary))
    other = tmp_path / "2026-12-02-arithmetic"  # another task: not a row of the letter-counting headline
    shutil.copytree(run, other)
    (other / "config.yaml").write_text(yaml.safe_dump({**cfg, "env": {"name": "arithmetic", "options": {}}}))
    header, _, reference, row = headline_rows(tmp_path)
    assert "56.2% (peak)" in reference and header.count("|") == row.count("|") == reference.count("|")
    assert row.startswith("| [2026-12-01-smollm2-curriculum](results/2026-12-01-smollm2-curriculum/report.md) |")
    assert "smollm2-135m-instruct, LoRA r32, cot SFT 300 x 64 + GRPO 50 updates" in row
    # 150 + 270 + 12 s (a failed try counts) = 7.2 min; one failed try
    assert "| NVIDIA H100 80GB HBM3 | 7.2 | 96.9% | 93.8% | 90.6% | 95.3% / 94.5% / 89.8% (n=128) | 1 |" in row


def test_sft_recipe_keeps_rows_of_the_same_configuration_only(tmp_path):
    from bench.common import earlier_rows

    path = tmp_path / "sft.json"
    old = {"machine": "m", "config": {"steps": 200}, "rows": {"base": {"x": 1}, "cot": {"x": 2}}}
    path.write_text(json.dumps(old))
    assert earlier_rows(path, {"machine": "m", "config": {"steps": 200}}, {"cot"}) == {"base": {"x": 1}}
    assert earlier_rows(path, {"machine": "m", "config": {"steps": 400}}, {"cot"}) == {}
    assert earlier_rows(path, {"machine": "other", "config": {"steps": 200}}, set()) == {}
    assert earlier_rows(tmp_path / "none.json", old, set()) == {}


def test_ablation_rows_change_one_thing_and_a_row_equal_to_the_base_is_not_run_twice(tmp_path, capsys):
    from bench.ablation import plan_rows
    rows = plan_rows(str(ROOT / "configs" / "gpu.yaml"), ["base", "no_curriculum", "full_ft", "direct"])
    assert rows["base"]["sets"] == []
    assert rows["no_curriculum"]["sets"] == ['stages=[{"difficulty": 6, "updates": 50}]']  # 10 + 40 updates
    # full fine-tuning at a tenth of the LoRA rates (gpu.yaml: sft.lr 1e-3, grpo.lr 5e-5)
    assert rows["full_ft"]["sets"] == ["model.lora.enabled=false", "sft.lr=0.0001", "grpo.lr=5e-06"]
    assert list(plan_rows(str(ROOT / "configs" / "gpu.yaml"), ["full_ft", "base", "full_ft"])) == ["full_ft", "base"]
    one_stage = tmp_path / "direct.yaml"
    one_stage.write_text("sft: {style: direct}\nstages:\n  - {difficulty: 3, updates: 4}\n")
    rows = plan_rows(str(one_stage), ["base", "no_curriculum", "direct", "cot_tokens"])
    assert set(rows) == {"base", "cot_tokens"}
    assert "already has SFT style direct" in capsys.readouterr().out


def test_an_ablation_is_named_by_its_config_s_values_away_from_the_defaults(tmp_path):
    from bench.ablation import config_key
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sft: {steps: 60, lr: 5.0e-4}\n")  # 5e-4 is the default: not part of the name
    assert config_key(str(cfg)) == {"sft.steps": 60}


def test_an_ablation_row_with_a_bad_override_is_refused_before_any_run(monkeypatch):
    from bench import ablation
    from picorl.config import ConfigError
    monkeypatch.setattr(ablation, "row_overrides", lambda cfg: {"base": ("the base config", []),
                                                                "broken": ("lr below 0", ["grpo.lr=-1"])})
    with pytest.raises(ConfigError, match=r"row broken \(grpo.lr=-1\): .*grpo.lr"):
        ablation.plan_rows(str(ROOT / "configs" / "smoke.yaml"), ["base", "broken"])


@pytest.mark.slow
def test_ablation_runs_a_row_through_picorl_train_and_keeps_earlier_rows(tmp_path):
    from bench.ablation import config_key, table
    from bench.common import machine
    smoke = str(ROOT / "configs" / "smoke.yaml")
    result = tmp_path / "results" / f"ablation-{''.join(c if c.isalnum() else '_' for c in machine())[:40]}-smoke.json"
    result.parent.mkdir()
    earlier = {"change": "the base config", "sets": [], "run_folder": "x", "final_update": 4, "training_minutes": 0.1,
               "after_sft": {d: {"exact": 0.5, "n": 4} for d in "356"}, "final": {d: {"exact": 0.75, "n": 4} for d in "356"}}
    result.write_text(json.dumps({"machine": machine(), "config": config_key(smoke), "rows": {"base": earlier}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    out = subprocess.run([sys.executable, "-m", "bench.ablation", "--config", smoke, "--runs", "direct",
                          "--out-dir", str(tmp_path / "runs"), "--results-dir", str(result.parent)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = json.loads(result.read_text())["rows"]
    assert list(rows) == ["base", "direct"] and rows["base"] == earlier
    direct = rows["direct"]
    assert direct["sets"] == ["sft.style=direct"] and direct["final_update"] == 4
    # The run folder holds what the row says: its config, and the evals the row copied.
    run_dir = tmp_path / "runs" / "direct" / direct["run_folder"]
    assert "style: direct" in (run_dir / "config.yaml").read_text()
    final = json.loads((run_dir / "evals" / "step_4.json").read_text())["by_difficulty"]
    assert direct["final"] == final and set(final) == {"3", "5", "6"}
    assert "| direct | SFT style direct (answer only) |" in out.stdout
    assert table({"rows": rows})[2].startswith("| base | the base config | 50.0% ±25.0 | 75.0% ±21.7 |")


@pytest.mark.slow
def test_rl_recipe_arms_start_from_one_sft_and_compare_item_by_item(tmp_path):
    """Two GRPO arms and more_sft from one SFT start (kept on disk, reused by a second run):
    each arm's gained and lost items account for its change in exact, on the same items."""
    smoke = str(ROOT / "configs" / "smoke.yaml")
    # max_tokens 40: room for the overlong_penalty arm's 32-token buffer (config validation refuses less)
    common = ["--config", smoke, "--set", "rollout.max_tokens=40", "--eval-size", "4", "--k", "2",
              "--results-dir", str(tmp_path / "res"),
              "--start-dir", str(tmp_path / "start")]
    first = subprocess.run([sys.executable, "-m", "bench.rl_recipe", "--arms", "binary", "more_sft", *common],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "SFT 3 x 2:" in first.stdout
    second = subprocess.run([sys.executable, "-m", "bench.rl_recipe", "--arms", "overlong_penalty", *common],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "SFT start from" in second.stdout  # the same start, not a second SFT
    (path,) = (tmp_path / "res").glob("rl_recipe-*-smoke.json")
    out = json.loads(path.read_text())
    assert list(out["rows"]) == ["binary", "overlong_penalty", "more_sft"]  # the ARMS order, earlier arms kept
    start_items = out["start"]["items"]
    for name, row in out["rows"].items():
        g = row["greedy"]
        assert g["n"] == 4 and g["before"] == out["start"]["greedy"]["exact"]
        assert g["after"] - g["before"] == pytest.approx((g["gained"] - g["lost"]) / g["n"])
        assert [i["string"] for i in row["end"]["items"]] == [i["string"] for i in start_items]
        assert set(row["sampled"]) == {"before", "after", "rose", "fell", "p_value", "pass_before", "pass_after"}
        assert row["sampled"]["rose"] + row["sampled"]["fell"] <= g["n"]
    assert len(out["rows"]["binary"]["updates"]) == 4  # smoke's stages: 2 + 2 updates
    assert "frac_truncated" in out["rows"]["binary"]["updates"][0]
    assert out["rows"]["more_sft"]["updates"] == [] and "more SFT steps" in out["rows"]["more_sft"]["change"]
    # Every arm's end weights are kept beside the start, one adapter's tensors each.
    (start_weights,) = (tmp_path / "start").glob("*/weights.pt")
    start_names = set(torch.load(start_weights, weights_only=True)["weights"])
    for arm in out["rows"]:
        (kept_arm,) = (tmp_path / "start").glob(f"*/arms/{path.stem}-{arm}.pt")
        assert set(torch.load(kept_arm, weights_only=True)) == start_names
    # Another eval tier is another measurement of the same weights, and another arm seed
    # another draw of GRPO from them: no second SFT.
    third = subprocess.run([sys.executable, "-m", "bench.rl_recipe", "--arms", "binary", *common, "--eval-difficulty",
                            "2", "--set", "stages=[{difficulty: 1, updates: 1}]", "--tag=-d2", "--seed", "7", "--fresh", "3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert "SFT start from" in third.stdout
    assert len(list((tmp_path / "start").glob("*/start-*.json"))) == 2
    (seeded,) = (tmp_path / "res").glob("rl_recipe-*-smoke-d2-seed7.json")
    seeded = json.loads(seeded.read_text())
    assert seeded["config"]["arm_seed"] == 7
    # The fresh words: measured at the start and after the arm, compared item by item.
    fresh = seeded["rows"]["binary"]["fresh"]
    assert fresh["n"] == 3 == len(seeded["start"]["fresh"]["items"])
    assert fresh["after"] - fresh["before"] == pytest.approx((fresh["gained"] - fresh["lost"]) / 3)
    assert not {i["string"] for i in seeded["start"]["fresh"]["items"]} & {i["string"] for i in seeded["start"]["items"]}
    # more_sft with its steps given: no GRPO arm needed for a budget; a count below 1 is refused
    fourth = subprocess.run([sys.executable, "-m", "bench.rl_recipe", "--arms", "more_sft", "--more-sft-steps", "2",
                             *common, "--tag=-more2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert fourth.returncode == 0, fourth.stdout[-2000:] + fourth.stderr[-3000:]
    (more,) = (tmp_path / "res").glob("rl_recipe-*-smoke-more2.json")
    assert json.loads(more.read_text())["rows"]["more_sft"]["change"] == "no GRPO: 2 more SFT steps"
    bad = subprocess.run([sys.executable, "-m", "bench.rl_recipe", "--arms", "more_sft", "--more-sft-steps", "0", *common],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert bad.returncode == 2 and "--more-sft-steps must be >= 1, got 0" in bad.stderr
    # A start given as an adapter folder (an export's sft_adapter): no SFT, the start kept
    # under its own key, the arms compared against it as against an SFT start.
    from picorl.config import load_config
    from picorl.models import load_for_config
    given, _ = load_for_config(load_config(smoke))
    given.save_pretrained(tmp_path / "given")
    fifth = subprocess.run([sys.executable, "-m", "bench.rl_recipe", "--arms", "binary", *common, "--tag=-given",
                            "--start-adapter", str(tmp_path / "given")], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert fifth.returncode == 0, fifth.stdout[-2000:] + fifth.stderr[-3000:]
    assert "start: the adapter in" in fifth.stdout and "SFT 3 x 2" not in fifth.stdout
    assert "SFT start from" not in fifth.stdout
    (given_start,) = (tmp_path / "start").glob("adapter-*/start-*.json")
    (given_out,) = (tmp_path / "res").glob("rl_recipe-*-smoke-given.json")
    given_out = json.loads(given_out.read_text())
    assert given_out["config"]["start_adapter"] == str(tmp_path / "given")
    assert given_out["start"] == json.loads(given_start.read_text()) and given_out["start"]["sft_seconds"] is None
    assert given_out["rows"]["binary"]["greedy"]["n"] == 4
    # The given adapter's SFT continued for 2 steps: SFT from it (not from the seeded init),
    # kept under the adapter's key and the steps; with no arms the measured start is the result.
    sixth = subprocess.run([sys.executable, "-m", "bench.rl_recipe", *common, "--tag=-given2", "--arms",
                            "--start-adapter", str(tmp_path / "given"), "--start-sft-steps", "2"], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert sixth.returncode == 0, sixth.stdout[-2000:] + sixth.stderr[-3000:]
    assert "start: the adapter in" in sixth.stdout and "SFT 2 x 2" in sixth.stdout
    (continued,) = (tmp_path / "start").glob("adapter-*-sft2-*/weights.pt")
    continued = torch.load(continued, weights_only=True)["weights"]
    from safetensors.torch import load_file
    given_b = {k: v for k, v in load_file(tmp_path / "given" / "adapter_model.safetensors").items() if "lora_B" in k}
    assert given_b and not any(torch.count_nonzero(v) for v in given_b.values())  # the seeded init's B is zero
    assert any(torch.count_nonzero(v) for n, v in continued.items() if "lora_B" in n)  # 2 steps moved it
    (given2,) = (tmp_path / "res").glob("rl_recipe-*-smoke-given2.json")
    given2 = json.loads(given2.read_text())
    assert given2["config"]["start_sft_steps"] == 2 and given2["rows"] == {}
    assert given2["start"]["greedy"]["n"] == 4 and given2["start"]["sft_seconds"] > 0


def test_start_adapter_loads_every_lora_weight_or_refuses(tmp_path):
    """--start-adapter's weights are the arms' start, all of them: an adapter saved by peft
    (as an export's sft_adapter is) loads tensor for tensor; one on other layers or of another
    rank is refused rather than half loaded over the seeded init."""
    from bench.rl_recipe import load_start_adapter
    from picorl.checkpoint import trained_weights
    from picorl.config import load_config
    from picorl.models import load_for_config
    smoke = str(ROOT / "configs" / "smoke.yaml")
    trained, _ = load_for_config(load_config(smoke))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()  # unlike the seeded init (its lora_B is zero)
    trained.save_pretrained(tmp_path / "trained")
    model, _ = load_for_config(load_config(smoke))
    want, before = trained_weights(trained), trained_weights(model)
    assert not any(torch.equal(want[n], before[n]) for n in want)
    load_start_adapter(model, tmp_path / "trained")
    got = trained_weights(model)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    fewer, _ = load_for_config(load_config(smoke, ["model.lora.target_modules=[q_proj, v_proj]"]))
    fewer.save_pretrained(tmp_path / "fewer")
    with pytest.raises(ValueError, match="is not this model's adapter: 0 weights the model's adapter lacks"):
        load_start_adapter(model, tmp_path / "fewer")
    wider, _ = load_for_config(load_config(smoke, ["model.lora.rank=8"]))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_start_adapter(model, tmp_path / "wider")
    # The command refuses a folder without an adapter, and more_sft (it continues an SFT that
    # a given start skipped), before any model loads.
    for argv, message in ((["--start-adapter", str(tmp_path)], "no adapter_model.safetensors there"),
                          (["--start-adapter", str(tmp_path / "trained"), "--arms", "more_sft"],
                           "more_sft continues the config's SFT"),
                          (["--start-sft-steps", "3"], "goes on from --start-adapter's SFT: give the adapter"),
                          (["--start-adapter", str(tmp_path / "trained"), "--start-sft-steps", "-1"],
                           "--start-sft-steps must be >= 0, got -1")):
        bad = subprocess.run([sys.executable, "-m", "bench.rl_recipe", "--config", smoke, *argv,
                              "--results-dir", str(tmp_path / "res")], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "res").exists()


def test_more_sft_fills_its_budget_at_the_pace_of_its_first_steps():
    """10 steps in 36 s is 3.6 s a step: a 900 s budget holds 250 steps in all; a budget the
    timed steps already overran keeps them (they are taken); nonsense is refused by name."""
    from bench.rl_recipe import steps_for_budget
    assert steps_for_budget(900.0, 10, 36.0) == 250
    assert steps_for_budget(20.0, 10, 36.0) == 10
    assert steps_for_budget(37.9, 10, 36.0) == 11  # 10.5 steps' worth, rounded
    with pytest.raises(ValueError, match="got 900.0, 10, 0"):
        steps_for_budget(900.0, 10, 0)


def test_arms_run_plain_grpo_unless_they_name_the_greedy_member():
    """configs/default.yaml turns the greedy member on; the arms measured without it keep
    running without it, and the arms that name it keep it."""
    from bench.rl_recipe import ARMS, arm_overrides
    from picorl.config import load_config
    default = str(ROOT / "configs" / "default.yaml")
    assert load_config(default).grpo.greedy_member
    assert not load_config(default, arm_overrides("binary")).grpo.greedy_member
    assert not load_config(default, arm_overrides("partial")).grpo.greedy_member
    assert load_config(default, arm_overrides("greedy_member")).grpo.greedy_member
    assert "grpo.greedy_member=false" not in arm_overrides("wide_member")
    assert arm_overrides("more_sft") == [] and ARMS["binary"][1] == ["reward.kind=binary"]  # ARMS itself untouched


def test_sampled_change_pairs_each_items_right_samples():
    """An item counts as risen when more of its k samples are right after than before; the sign
    test weighs the risen against the fallen, and an item that did not move carries nothing."""
    from bench.rl_recipe import sampled_change
    before = {"k": 4, "per_item": [0, 0, 0, 0, 0, 4, 0, 0]}
    after = {"k": 4, "per_item": [1, 2, 1, 4, 1, 4, 0, 3]}
    s = sampled_change(before, after)
    assert (s["rose"], s["fell"]) == (6, 0)
    assert s["p_value"] == pytest.approx(2 / 2 ** 6)  # both all-one-way splits of 6 changed items
    # 4 of 32 samples right, then 16 of 32; one item of 8 with a right sample, then 7
    assert (s["before"], s["after"], s["pass_before"], s["pass_after"]) == (4 / 32, 16 / 32, 1 / 8, 7 / 8)
    s = sampled_change(after, before)
    assert (s["rose"], s["fell"]) == (0, 6)



def test_arm_result_splits_letter_counting_items_by_the_constant_answer():
    """Items where every asked letter occurs once, or none does, are those a collapse onto a
    constant answer gets right; the split reports them apart from the items that need
    counting, each part with its own gained / lost and sampled rose / fell."""
    from bench.rl_recipe import arm_result, constant_answer_split
    records = [{"string": s, "letters": list(ls), "answer": {c: s.count(c) for c in ls}}
               for s, ls in [("cat", "ca"), ("tree", "e"), ("dog", "d"), ("moon", "om"), ("sky", "xz")]]
    split = constant_answer_split(records)
    assert split == {"all_ones": [True, False, True, False, False], "all_zeros": [False, False, False, False, True],
                     "counting": [False, True, False, True, False]}
    items = lambda exact: [{"string": r["string"], "letters": r["letters"], "exact": e} for r, e in zip(records, exact)]
    start = {"items": items([0, 1, 0, 0, 1]), "sampled": {"k": 4, "per_item": [1, 3, 0, 2, 4]}}
    end = {"items": items([1, 0, 1, 0, 1]), "sampled": {"k": 4, "per_item": [4, 1, 4, 2, 4]}}
    r = arm_result("c", [], start, end, 1.0, [], split)
    assert (r["greedy"]["gained"], r["greedy"]["lost"]) == (2, 1)
    ones, zeros, counting = (r["split"][k] for k in ("all_ones", "all_zeros", "counting"))
    assert (ones["greedy"]["n"], ones["greedy"]["gained"], ones["greedy"]["lost"]) == (2, 2, 0)
    assert (counting["greedy"]["n"], counting["greedy"]["gained"], counting["greedy"]["lost"]) == (2, 0, 1)
    assert (zeros["greedy"]["n"], zeros["greedy"]["before"], zeros["greedy"]["after"]) == (1, 1.0, 1.0)
    assert (ones["sampled"]["before"], ones["sampled"]["after"]) == (1 / 8, 8 / 8)
    assert (counting["sampled"]["rose"], counting["sampled"]["fell"]) == (0, 1)
    # a part with no items is left out (its means have no items to average)
    assert list(arm_result("c", [], start, end, 1.0, [], {**split, "empty": [False] * 5})["split"]) == \
        ["all_ones", "all_zeros", "counting"]
    # another environment's records (no asked letters) are not split
    assert constant_answer_split([{"prompt": "2+2", "answer": "4"}]) is None


def test_greedy_change_is_split_by_the_start_s_right_samples():
    """Each item lands in the row of its count of right samples at the start (0..k); a row
    counts its greedy-wrong items and those gained, its greedy-right items and those lost, so
    the rows add up to the arm's gained / lost. Greedy-only arms (no samples) have no rows."""
    from bench.rl_recipe import arm_result, greedy_by_samples
    items = lambda exact: [{"exact": e} for e in exact]
    start = {"items": items([0, 0, 1, 0, 1, 1]), "sampled": {"k": 2, "per_item": [0, 1, 1, 1, 2, 0]}}
    end = {"items": items([0, 1, 0, 1, 1, 1])}
    rows = greedy_by_samples(start, end)
    assert rows == [{"right_samples": 0, "wrong": 1, "gained": 0, "right": 1, "lost": 0},
                    {"right_samples": 1, "wrong": 2, "gained": 2, "right": 1, "lost": 1},
                    {"right_samples": 2, "wrong": 0, "gained": 0, "right": 1, "lost": 0}]
    r = arm_result("c", [], start, end, 1.0, [])
    assert r["greedy_by_samples"] == rows
    assert (sum(b["gained"] for b in rows), sum(b["lost"] for b in rows)) == (r["greedy"]["gained"], r["greedy"]["lost"])
    assert "greedy_by_samples" not in arm_result("c", [], {"items": start["items"]}, end, 1.0, [])


def test_chain_figures_tell_counting_from_answers_that_ignore_their_chain():
    """An exact answer is right by counting only when the chain's own tally is right and the
    answer says it; a constant answer that happens to be right, after a chain that counted
    something else, is exact but not counted; so is a right chain whose answer differs."""
    from bench.rl_recipe import arm_result, chain_figures
    records = [{"string": s, "letters": list(ls), "answer": {c: s.count(c) for c in ls}}
               for s, ls in [("moon", "om"), ("cat", "ca"), ("tree", "er"), ("sky", "s")]]
    completions = ['<think>m1 o1 o2 n</think><answer>{"o": 2, "m": 1}</answer>',   # counted, said: right
                   '<think>c1 a1 a2 t</think><answer>{"c": 1, "a": 1}</answer>',   # exact, chain says a: 2
                   '<think>t r1 e1 e2</think><answer>{"e": 1, "r": 1}</answer>',   # chain right, answer not
                   '<think>s1 k y s2 k y s3 k y']                                  # a loop: no answer, no chain
    exact = [1, 1, 0, 0]
    items = [{"completion": c, "exact": e} for c, e in zip(completions, exact)]
    assert chain_figures(records, items) == {"n": 4, "tally_right": 2, "answer_follows_chain": 1, "right_by_count": 1}
    start = {"items": [{"completion": "<answer>0</answer>", "exact": 0}] * 4}
    r = arm_result("c", [], start, {"items": items}, 1.0, [], None, records)
    assert r["chains"]["before"] == {"n": 4, "tally_right": 0, "answer_follows_chain": 0, "right_by_count": 0}
    assert r["chains"]["after"]["right_by_count"] == 1
    # other environments' records have no letters to count: no chain figures
    assert chain_figures([{"prompt": "2+2", "answer": "4"}], [{"completion": "4"}]) is None
    assert "chains" not in arm_result("c", [], start, {"items": items}, 1.0, [], None, [{"prompt": "p", "answer": "4"}] * 4)


def test_the_spelling_arm_trains_on_letter_counting_s_spelling_reward():
    """An arm of ARM_REWARDS hands the trainer its own reward (exact and formatted still the
    env's grade, for the per-update figures); every other arm keeps the config's reward.kind."""
    from bench.rl_recipe import ARMS, arm_reward
    from picorl.envs.letter_counting import LetterCounting
    from picorl.rollout.base import Completion
    env = LetterCounting()
    record = {"string": "moon", "letters": ["o"], "answer": {"o": 2}}
    reward = arm_reward("spelling", env)
    assert reward(Completion("<think>m o1 n</think><answer>2</answer>", [], []), record) == \
        (pytest.approx(0.5 + 0.5 * 6 / 7), True, True)
    assert reward(Completion("<think>m o1 n</think>", [], []), record) == (0.0, False, False)
    assert "spelling" in ARMS and arm_reward("binary", env) is None
    assert arm_reward("spelling_mid", env)(Completion("<think>m o1 n</think><answer>2</answer>", [], []),
                                           record)[0] == pytest.approx(0.5 + 0.5 * 6 / 7)


def test_spelling_reads_which_letters_and_tokens_a_chain_spelt():
    """A letter is spelt when the alignment of spelling to string covers it, a token when all
    its letters are; pieces that do not join back to the string cannot be assigned."""
    from bench.spelling import spelling_figures, spelt_letters, token_spelling
    assert spelt_letters("moon", "mon") == [True, True, False, True]
    assert spelt_letters("moon", "") == [False] * 4
    assert token_spelling(["mo", "on"], "moon", "mon") == [("mo", True), ("on", False)]
    assert token_spelling(["mo", "on"], "moon", "moon") == [("mo", True), ("on", True)]
    assert token_spelling([" mo", "on"], "moon", "moon") is None
    cuts = {"moon": ["mo", "on"], "sky": ["sky"]}
    items = [{"string": "moon", "completion": "<think>m o1 o2 n</think><answer>2</answer>", "exact": 1.0},
             {"string": "moon", "completion": "<think>m o1 n</think><answer>2</answer>", "exact": 1.0},
             {"string": "sky", "completion": "<think>sky</think><answer>1</answer>", "exact": 0.0}]
    f = spelling_figures(items, cuts.__getitem__, {"mo": 3, "on": 1})
    # "sky" written whole spells "?" (closeness 0); "mon" against "moon" is 2 x 3 / 7
    assert (f["n"], f["spelt_exactly"], f["exact"]) == (3, 1, 2)
    assert f["closeness"] == pytest.approx(round((1 + 6 / 7 + 0) / 3, 4))
    assert f["tokens_by_length"] == {"2": {"right": 3, "n": 4, "share": 0.75}, "3": {"right": 0, "n": 1, "share": 0.0}}
    assert f["tokens_by_exposure"] == {"seen 1-2, 2": {"right": 1, "n": 2, "share": 0.5},
                                       "seen 3+, 2": {"right": 2, "n": 2, "share": 1.0},
                                       "unseen, 3": {"right": 0, "n": 1, "share": 0.0}}


def test_spelling_bench_reads_a_result_file_and_names_a_bad_one(tmp_path, capsys):
    from bench.spelling import main
    items = [{"string": "overmodest", "completion": "<think>o1 v e r m o2 d e s t</think><answer>2</answer>",
              "exact": 1.0},
             {"string": "overmodest", "completion": "<think>o1 v e r</think><answer>1</answer>", "exact": 0.0}]
    run = {"config": {"config": str(ROOT / "configs/default.yaml"), "sets": ["data.train_size=20"]},
           "start": {"items": items}, "rows": {"mid_lr": {"end": {"items": items[:1] * 2}}}}
    path = tmp_path / "rl_recipe-x.json"
    path.write_text(json.dumps(run))
    assert main([str(path), "--results-dir", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "spelling-rl_recipe-x.json").read_text())
    figures = out["runs"]["rl_recipe-x.json"]
    assert (figures["start"]["spelt_exactly"], figures["mid_lr"]["spelt_exactly"]) == (1, 2)
    assert sum(v["n"] for v in figures["start"]["tokens_by_length"].values()) > 0
    assert figures["start"]["items_not_cut"] == 0
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main([str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_session_dry_run_goes_end_to_end_and_writes_no_result(tmp_path):
    """bench/gpu_session.sh --dry-run: the smoke run through the flow, its export and the table,
    the CUDA tests (skipped here), the update profile on the tiny model; nothing written under
    results/ or bench/results/."""
    before = sorted(p.name for p in (ROOT / "results").iterdir()), sorted(p.name for p in (ROOT / "bench" / "results").iterdir())
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHON": sys.executable, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for name in ("train", "export", "table", "cuda-tests", "update-profile"):
        assert f"=== {name}: ok" in r.stdout, name
    assert "=== would run: python -m bench.vs_trl" in r.stdout and "=== done: 0 step(s) failed" in r.stdout
    (export,) = tmp_path.glob("tmp.*/results/smoke-export")
    assert (export / "run.json").is_file() and (export / "fresh_eval.jsonl").is_file()
    after = sorted(p.name for p in (ROOT / "results").iterdir()), sorted(p.name for p in (ROOT / "bench" / "results").iterdir())
    assert after == before


def test_logprobs_bench_runs_both_ways_in_their_own_processes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.logprobs", "--model", "tiny-random-llama", "--tasks", "2",
                          "--k", "2", "--max-tokens", "4", "--chunk", "3", "--repeats", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| whole") or line.startswith("| chunked")]
    assert len(rows) == 2 and "x lower chunked" in out.stdout and "wrote" not in out.stdout
