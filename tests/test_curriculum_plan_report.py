import subprocess
import sys

import pytest

from picorl.config import load_config
from picorl.curriculum import Curriculum
from picorl.plan import chunks, describe_plan, eval_steps, stage_names, train_difficulties
from picorl.report import observations, render_report


def test_promotes_when_the_full_window_reaches_the_threshold():
    c = Curriculum(difficulty=1, promote_at=0.75, demote_below=0.2, window=4, max_difficulty=3)
    assert c.observe([1, 1, 1]) is None          # window not full yet
    assert c.observe([0.0]) == 2                 # mean 0.75 reaches 0.75
    assert c.recent == []                        # a fresh window for the new difficulty
    c = Curriculum(difficulty=1, promote_at=0.75, window=4)
    assert c.observe([1, 1, 0.5, 0.25]) is None and c.difficulty == 1  # mean 0.6875


def test_promotion_demotion_and_bounds():
    c = Curriculum(difficulty=2, promote_at=0.8, demote_below=0.2, window=4, max_difficulty=3)
    assert c.observe([1, 1, 1, 1]) == 3 and c.recent == []
    assert c.observe([1, 1, 1, 1]) is None and c.difficulty == 3   # capped at max
    assert c.observe([0, 0, 0, 0]) == 2                              # demote
    c = Curriculum(difficulty=1, promote_at=0.8, demote_below=0.2, window=2)
    assert c.observe([0, 0]) is None and c.difficulty == 1          # floor


def test_fixed_stage_never_moves_and_state_round_trips():
    c = Curriculum(difficulty=6, window=2)
    assert c.observe([1, 1, 1, 1]) is None and c.difficulty == 6 and c.reachable() == [6]
    d = Curriculum(difficulty=1, promote_at=0.5, window=3, max_difficulty=4)
    assert d.reachable() == [1, 2, 3, 4]
    d.observe([1, 0])
    e = Curriculum(difficulty=1, promote_at=0.5, window=3, max_difficulty=4)
    e.load_state_dict(d.state_dict())
    assert e.observe([1]) == d.observe([1]) == 2


def test_chunks_split_at_evals_stages_and_chunk_size():
    cfg = load_config(None, ["run.chunk_updates=4", "eval.every=5",
                             "stages=[{difficulty: 1, updates: 7}, {difficulty: 3, updates: 6}]"])
    got = [(c.stage, c.start, c.end, c.eval_after) for c in chunks(cfg)]
    assert got == [(0, 0, 4, False), (0, 4, 5, True), (0, 5, 7, True),
                   (1, 7, 10, True), (1, 10, 13, True)]
    assert eval_steps(cfg) == [0, 5, 7, 10, 13]
    assert stage_names(cfg) == ["grpo-d1", "grpo-d3"]


def test_plan_names_repeated_stages_and_reachable_data():
    cfg = load_config(None, ["stages=[{difficulty: 2, updates: 1}, {difficulty: 2, updates: 1, promote_at: 0.8, max_difficulty: 4}]",
                             "sft.difficulties=[1]"])
    assert stage_names(cfg) == ["grpo-d2", "grpo-d2-2"]
    assert train_difficulties(cfg) == [1, 2, 3, 4]
    text = describe_plan(cfg)
    assert "updates    2 in 2 chunks" in text and "promote at 0.8" in text


def test_seed_config_plan_matches_the_reference_run():
    cfg = load_config("configs/seed_qwen3_4b.yaml")
    text = describe_plan(cfg)
    assert "Qwen/Qwen3-4B-Instruct-2507 (LoRA r32/a64)" in text
    assert "200 updates" in text and "8 tasks x k 8" in text
    assert eval_steps(cfg) == list(range(0, 201, 10))
    assert "12800 training completions" in text


def test_dry_run_prints_plan_without_loading_a_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli", "train", "--config", "configs/seed_qwen3_4b.yaml",
                        "--dry-run", "--set", "grpo.lr=1e-6"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "stage      grpo-d6: 200 updates" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "cli", "train", "--config", "configs/seed_qwen3_4b.yaml",
                          "--dry-run", "--set", "grpo.group_size=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "grpo.group_size=1 must be >= 2" in bad.stderr


def _rows():
    history = [{"kind": "sft", "step": 1, "stage": "sft", "metrics": {"sft/loss": 2.0}},
               {"kind": "sft", "step": 2, "stage": "sft", "metrics": {"sft/loss": 0.5}}]
    for s in range(1, 5):
        history.append({"kind": "train", "step": s, "stage": 0, "metrics": {
            "train/reward_mean": s / 4, "train/frac_correct": s / 4, "train/frac_zero_var_groups": 0.0,
            "train/completion_len": 50.0, "train/difficulty": 1.0, "train/loss": 0.1, "train/grad_norm": 1.0}})
    evals = [{"kind": "eval", "step": s, "stage": 0, "metrics": {"eval/acc_d3": a, "eval/format_d3": 1.0}}
             for s, a in [(0, 0.5), (2, 0.9), (4, 0.7)]]
    return history, evals


def test_report_tables_bold_best_and_observations(tmp_path):
    from picorl.report import write_report
    cfg = load_config(None)
    history, evals = _rows()
    md = render_report(cfg, history, evals)
    assert "| 2.000 -> 0.500 | 100.0% | 0.250 (update 1) |" in md
    assert "| 2 | **90.0%** |" in md and "| 4 | 70.0% |" in md
    obs = observations(evals)
    assert obs == ["d3: 50.0% after SFT, peak 90.0% at update 2, final 70.0% at update 4; 20.0% below its peak at the end"]
    report, curves = write_report(cfg, history, evals, tmp_path)
    assert report.read_text() == md and curves.stat().st_size > 10_000


def test_plateau_is_called_out():
    evals = [{"kind": "eval", "step": s, "metrics": {"eval/acc_d6": a}} for s, a in
             [(0, 0.1), (10, 0.5), (20, 0.55), (30, 0.53), (40, 0.56)]]
    assert "plateau over the last 3 evals (53.0%-56.0%)" in observations(evals)[0]


def test_report_shows_truncation_and_what_grpo_changed(tmp_path):
    """The reward table carries the loop diagnostics ('-' for rows recorded before them), and the
    gains section states the paired comparison of the first and last eval."""
    import json

    from picorl.run_records import grpo_gains
    from picorl.report import gain_line
    from picorl.run_folder import RunFolder
    cfg = load_config(None)
    history, evals = _rows()
    history[-1]["metrics"].update({"train/frac_truncated": 0.25, "train/frac_formatted": 0.875})
    run = RunFolder(tmp_path)
    items = [{"difficulty": 3, "string": w, "letters": ["a"], "exact": e} for w, e in
             [("ab", 0.0), ("ba", 0.0), ("aa", 1.0), ("bb", 0.0)]]
    later = [{**i, "exact": e} for i, e in zip(items, [1.0, 1.0, 0.0, 0.0])]
    run.eval_file(0).parent.mkdir(parents=True)
    for step, its in ((0, items), (4, later)):
        run.eval_file(step).write_text(json.dumps({"step": step, "by_difficulty": {"3": {"exact": 0}}, "items": its}))
    gains = grpo_gains(tmp_path)
    assert gains["3"]["gained"] == 2 and gains["3"]["lost"] == 1 and gains["3"]["n"] == 4
    assert (gains["3"]["before"], gains["3"]["after"]) == (0.25, 0.5)
    md = render_report(cfg, history, evals, gains=gains)
    assert "| 4 | d1 | 1.000 | 1.000 | 0.00 | 50 | 25% | 88% |" in md
    assert "| 1 | d1 | 0.250 | 0.250 | 0.00 | 50 | - | - |" in md
    assert ("d3 exact after SFT 25.0% -> after GRPO 50.0% on 4 held-out items (gained 2, lost 1; sign test p = 1)"
            == gain_line("3", gains["3"]))
    assert gain_line("3", gains["3"]) in md


def test_gain_line_adds_the_sampled_pair_when_the_evals_sampled(tmp_path):
    """With eval.samples the line also says how the fraction of right samples moved item by
    item, and pass@k with the run's k."""
    import json

    from picorl.report import gain_line
    from picorl.run_folder import RunFolder
    from picorl.run_records import grpo_gains
    run = RunFolder(tmp_path)
    words = ["ab", "ba", "aa", "bb"]
    # 4 samples an item: 0, 1, 1, 2 right after SFT; 2, 3, 1, 0 at the end (rose on 2, fell on 1)
    first = [{"difficulty": 3, "string": w, "letters": ["a"], "exact": 0.0, "sampled": f} for w, f in
             zip(words, [0.0, 0.25, 0.25, 0.5])]
    last = [{**i, "sampled": f} for i, f in zip(first, [0.5, 0.75, 0.25, 0.0])]
    run.eval_file(0).parent.mkdir(parents=True)
    for step, its in ((0, first), (4, last)):
        run.eval_file(step).write_text(json.dumps({"step": step, "by_difficulty": {"3": {"exact": 0}}, "items": its,
                                                   "samples": 4}))
    line = gain_line("3", grpo_gains(tmp_path)["3"])
    assert line == ("d3 exact after SFT 0.0% -> after GRPO 0.0% on 4 held-out items (gained 0, lost 0; sign test "
                    "p = 1); sampled 25.0% -> 37.5% (rose on 2, fell on 1; p = 1), pass@4 75.0% -> 75.0%")


def test_gain_line_adds_the_reasoned_pair_where_the_env_reads_working(tmp_path):
    """Letter counting's evals say which exact answers are what their own chain counted; the
    line pairs that fraction item by item, so a gain made of guesses shows as one."""
    import json

    from picorl.report import gain_line
    from picorl.run_folder import RunFolder
    from picorl.run_records import grpo_gains
    run = RunFolder(tmp_path)
    words = ["ab", "ba", "aa", "bb"]
    first = [{"difficulty": 3, "string": w, "letters": ["a"], "exact": e, "reasoned": r} for w, e, r in
             zip(words, [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])]
    last = [{**i, "exact": e, "reasoned": r} for i, e, r in zip(first, [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0])]
    run.eval_file(0).parent.mkdir(parents=True)
    for step, its in ((0, first), (4, last)):
        run.eval_file(step).write_text(json.dumps({"step": step, "by_difficulty": {"3": {"exact": 0}}, "items": its}))
    line = gain_line("3", grpo_gains(tmp_path)["3"])
    assert line == ("d3 exact after SFT 25.0% -> after GRPO 75.0% on 4 held-out items (gained 2, lost 0; sign test "
                    "p = 0.5); reasoned 25.0% -> 25.0% (gained 1, lost 1; p = 1)")


def test_eval_metric_names_are_built_and_read_back_in_one_place():
    from picorl.metrics import eval_difficulties, eval_metric, eval_metrics, parse_eval_metric
    m = eval_metrics({"3": {"exact": 0.5, "partial": 0.75, "formatted": 1.0, "n": 4}, 10: {"exact": 0.1, "partial": 0.2,
                                                                                          "formatted": 0.3, "n": 4}})
    assert m == {"eval/acc_d3": 0.5, "eval/partial_d3": 0.75, "eval/format_d3": 1.0,
                 "eval/acc_d10": 0.1, "eval/partial_d10": 0.2, "eval/format_d10": 0.3}
    assert [parse_eval_metric(k) for k in m] == [("acc", 3), ("partial", 3), ("format", 3),
                                                 ("acc", 10), ("partial", 10), ("format", 10)]
    assert parse_eval_metric("train/frac_correct") is None and parse_eval_metric("eval/acc_dx") is None
    assert eval_difficulties([{"metrics": m}, {"metrics": {"train/loss": 1.0}}]) == [3, 10]  # 10 after 3, not "10" < "3"
    with pytest.raises(ValueError, match="eval metric kind 'exact'"):
        eval_metric("exact", 3)
