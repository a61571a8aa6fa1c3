"""The environment interface: loading and checking one, the built-in arithmetic and jsonl
environments, letter counting through the interface, and the data layer for any of them."""
import json
import random
import re
import sys
import textwrap
from pathlib import Path

import pytest

from picorl import data
from picorl.config import ConfigError, load_config
from picorl.envs import load_env
from picorl.envs.base import EnvError, Environment, Grade, reward_of_grade
from picorl.envs.letter_counting import parse_answer, reward_of

ROOT = Path(__file__).resolve().parents[1]


def readme_environment() -> str:
    """The complete environment the README's "Your own task" section shows."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own task"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The README's environment copied into a module of its own, as a user would."""
    (tmp_path / "my_task.py").write_text(readme_environment())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_task:Reverse"
    sys.modules.pop("my_task", None)


# ---------------------------------------------------------------- loading and checking


def test_the_readme_environment_is_short_and_complete(user_module):
    assert len(readme_environment().strip().splitlines()) < 40
    env = load_env(user_module)
    rec = data.train_records(2, 3, env=env)[0]
    assert rec["messages"] == env.messages(rec) and len(rec["word"]) == 5
    g = env.grade(f"<answer>{rec['answer']}</answer>", rec)
    assert g == Grade(exact=True, partial=1.0, formatted=True, prediction=rec["answer"])
    assert env.grade("no tags", rec).formatted is False
    wrong = env.grade(f"<answer>{rec['answer'][:-1]}x</answer>", rec)
    assert not wrong.exact and wrong.partial == pytest.approx(4 / 5)


@pytest.mark.parametrize("name,says", [
    ("nope", "neither a built-in environment"),
    ("no_such_module_xyz:Env", "cannot import no_such_module_xyz"),
    ("json:Nothing", "json has no Nothing"),
    ("json:JSONDecoder", "not a subclass of picorl.envs.base.Environment"),
])
def test_a_bad_env_name_is_one_clear_line(name, says):
    with pytest.raises(EnvError, match=says):
        load_env(name)
    with pytest.raises(ConfigError, match=says):
        load_config(None, [f"env.name={name}"])


def write_module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text("from picorl.envs.base import Environment\n" + textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_an_incomplete_or_malformed_environment_is_refused(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "half_env", """
        class Half(Environment):
            name = "half"
            tiers = {1: "one"}
            def make_record(self, rng, difficulty, split):
                return {"difficulty": difficulty}
            def messages(self, record):
                return []

        class Gappy(Half):
            tiers = {1: "one", 3: "three"}
            def parse(self, completion, record):
                return None
            def fraction_right(self, prediction, record):
                return 0.0
    """)
    with pytest.raises(EnvError, match="does not implement fraction_right, parse"):
        load_env("half_env:Half")
    with pytest.raises(EnvError, match=r"numbered 1, 2, \.\.\. without gaps, got \[1, 3\]"):
        load_env("half_env:Gappy")
    with pytest.raises(EnvError, match="takes no env.options, got colour"):
        load_env("half_env:Gappy", {"colour": "red"})


def test_config_is_checked_against_the_environment_before_any_work(user_module):
    base = [f"env.name={user_module}", "sft.enabled=false", "stages=[{difficulty: 1, updates: 2}]",
            "eval.difficulties=[1, 2]"]
    assert load_config(None, base).env.name == user_module
    with pytest.raises(ConfigError, match=r"eval.difficulties holds 4; difficulties must be in 1-3 \(the tiers of reverse\)"):
        load_config(None, base + ["eval.difficulties=[4]"])
    with pytest.raises(ConfigError, match=r"stages.0.difficulty=5 must be in 1-3"):
        load_config(None, base + ["stages=[{difficulty: 5, updates: 2}]"])
    with pytest.raises(ConfigError, match="stages.0.max_difficulty=10 must be in 1-3"):
        load_config(None, base + ["stages=[{difficulty: 1, updates: 2, promote_at: 0.8}]"])
    with pytest.raises(ConfigError, match="env reverse offers no SFT demonstrations: set sft.enabled=false"):
        load_config(None, base + ["sft.enabled=true", "sft.difficulties=[1]"])
    with pytest.raises(ConfigError, match=r"sft.style='cot_tokens' is not one of cot, direct \(the styles env arithmetic offers\)"):
        load_config(None, ["env.name=arithmetic", "sft.style=cot_tokens", "sft.difficulties=[1]",
                           "eval.difficulties=[1]", "stages=[{difficulty: 1, updates: 2}]"])


# ---------------------------------------------------------------- letter counting through the interface


def test_letter_counting_rewards_through_the_interface_are_the_old_ones():
    env = load_env("letter_counting")
    recs = data.train_records(2, 20, seed=3) + data.train_records(4, 20, seed=3)
    rng = random.Random(0)
    for r in recs:
        right = r["answer"]
        guesses = [right, {c: n + rng.choice([0, 1]) for c, n in right.items()}, {c: 0 for c in right}]
        texts = ["nothing", "<answer>x</answer>"] + [
            f"<answer>{g[r['letters'][0]]}</answer>" if len(g) == 1 else f"<answer>{json.dumps(g)}</answer>"
            for g in guesses]
        for t in texts:
            for kind in ("binary", "partial"):
                for bonus in (0.0, 0.1):
                    old = reward_of(parse_answer(t, r["letters"]), right, kind=kind, format_bonus=bonus)
                    assert reward_of_grade(env.grade(t, r), kind, bonus) == old, (t, kind, bonus)


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_demonstrations_parse_to_the_true_answer_at_every_tier():
    env = load_env("arithmetic")
    for d in env.tiers:
        for r in data.train_records(d, 25, env=env):
            for style in env.demo_styles:
                assert env.grade(env.demonstration(r, style), r).exact, (style, r)


def test_arithmetic_cot_carries_digit_by_digit():
    env = load_env("arithmetic")
    rec = {"difficulty": 1, "a": 47, "op": "+", "b": 85, "answer": 132}
    assert env.demonstration(rec, "cot") == ("<think>\n7+5=12, write 2 carry 1\n4+8+1=13, write 13\n47+85=132\n"
                                             "</think>\n<answer>132</answer>")
    mul = env.demonstration({"difficulty": 5, "a": 347, "op": "*", "b": 25, "answer": 8675}, "cot")
    assert "7*5=35, write 5 carry 3\n4*5+3=23, write 3 carry 2\n3*5+2=17, write 17\n347*5=1735" in mul
    assert "shifted 1: 6940" in mul and "1735+6940=8675" in mul and mul.endswith("<answer>8675</answer>")


def test_arithmetic_grades_by_digits_in_place():
    env = load_env("arithmetic")
    rec = {"difficulty": 1, "a": 47, "op": "+", "b": 85, "answer": 132}
    assert env.grade("<answer>132</answer>", rec) == Grade(True, 1.0, True, 132)
    assert env.grade("<answer>122</answer>", rec).partial == pytest.approx(2 / 3)
    assert env.grade("<answer>1320</answer>", rec).partial == 0.0
    for unformatted in ("132", "<answer>-132</answer>", "<answer>1.5</answer>", "<answer></answer>"):
        assert not env.grade(unformatted, rec).formatted, unformatted
    assert not env.grade("<answer>" + "9" * 5000 + "</answer>", rec).exact  # no 5000-digit int conversion


def test_arithmetic_sets_are_seeded_distinct_and_held_out():
    env = load_env("arithmetic")
    ev = data.eval_records(1, 300, env=env)
    assert ev == data.eval_records(1, 300, env=env) and len({env.key(r) for r in ev}) == 300
    held = {env.key(r) for r in data.eval_records(1, data.EVAL_POOL, env=env)}
    train = data.train_records(1, 2000, env=env)
    assert not held & {env.key(r) for r in train}
    assert all(r["answer"] == r["a"] + r["b"] and 10 <= r["a"] <= 99 for r in train)
    assert data.fresh_capacity(1, env) == 90 * 90 - data.EVAL_POOL
    with pytest.raises(ValueError, match="at most 7076 fresh items"):
        data.check_fresh_size(1, 7077, env)


def test_arithmetic_records_survive_a_dataset_and_a_jsonl_file(tmp_path):
    env = load_env("arithmetic")
    recs = data.train_records(5, 6, env=env)
    data.save_dataset(recs, tmp_path / "ds", env)
    assert data.load_records(tmp_path / "ds") == recs
    data.write_jsonl(recs, tmp_path / "r.jsonl")
    assert data.read_jsonl(tmp_path / "r.jsonl", env) == recs
    (tmp_path / "bad.jsonl").write_text(json.dumps({**recs[0], "answer": recs[0]["answer"] + 1}) + "\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: 'answer' must be"):
        data.read_jsonl(tmp_path / "bad.jsonl", env)


# ---------------------------------------------------------------- jsonl


def write_tasks(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_exact_and_numeric_match(tmp_path):
    path = write_tasks(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "answer": f"Answer  {i}"} for i in range(200)])
    env = load_env("jsonl", {"path": path, "ignore_case": True})
    rec = data.eval_records(1, 3, env=env)[0]
    assert rec["messages"][-1] == {"role": "user", "content": rec["prompt"]}
    assert env.grade(f"<think>hm</think><answer> answer {rec['answer'].split()[-1]} </answer>", rec).exact
    assert not env.grade("<answer>answer -1</answer>", rec).exact
    num = write_tasks(tmp_path / "n.jsonl", [{"prompt": f"q{i}", "answer": i / 4} for i in range(200)])
    env = load_env("jsonl", {"path": num, "match": "numeric", "tolerance": 0.01})
    rec = {"prompt": "q", "answer": 2.5}
    assert env.grade("<answer>2.505</answer>", rec).exact and not env.grade("<answer>2.52</answer>", rec).exact
    assert not env.grade("<answer>two</answer>", rec).formatted


def test_jsonl_holds_out_the_same_lines_everywhere_and_climbs_its_difficulties(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i), "difficulty": 1 + i % 3, "demonstration": f"<answer>{i}</answer>"}
            for i in range(600)]
    env = load_env("jsonl", {"path": write_tasks(tmp_path / "t.jsonl", rows)})
    assert env.tiers == {1: "difficulty 1", 2: "difficulty 2", 3: "difficulty 3"} and env.demo_styles == ("given",)
    cap = env.capacity(2, "eval")
    assert 5 < cap < 40  # about a tenth of d2's 200 lines
    ev = data.eval_records(2, cap, env=env)
    assert len({r["prompt"] for r in ev}) == cap and all(r["difficulty"] == 2 for r in ev)
    train = data.train_records(2, 100, env=env)
    assert not {r["prompt"] for r in ev} & {r["prompt"] for r in train}
    assert env.grade(env.demonstration(train[0], "given"), train[0]).exact
    with pytest.raises(data.DataError, match=f"has {cap} distinct eval items, {cap + 1} asked for"):
        data.eval_records(2, cap + 1, env=env)
    with pytest.raises(data.DataError, match="env jsonl has no fresh split"):
        data.fresh_records(2, 3, env=env)
    with pytest.raises(ConfigError, match=f"data.eval_size=128 is more than the {env.capacity(1, 'eval')} distinct"):
        load_config(None, ["env.name=jsonl", f"env.options.path={tmp_path / 't.jsonl'}", "sft.style=given",
                           "sft.difficulties=[1]", "eval.difficulties=[1]", "stages=[{difficulty: 1, updates: 2}]"])


@pytest.mark.parametrize("rows,options,says", [
    ([{"prompt": "q", "answer": "a"}] * 3, {}, "training and .* held-out lines"),
    ([{"prompt": f"q{i}", "answer": "a", **({"difficulty": 1} if i else {})} for i in range(50)], {},
     "'difficulty' must be on every line or on none"),
    ([{"prompt": f"q{i}", "answer": "a", "difficulty": 1 + 2 * (i % 2)} for i in range(50)], {},
     r"difficulties must run 1, 2, ... without gaps, found \[1, 3\]"),
    ([{"prompt": "q", "answer": "x"}], {"match": "numeric"}, r"t.jsonl:1: match is numeric but 'answer' 'x'"),
    ([{"question": "q", "answer": "x"}], {}, r"t.jsonl:1: expected an object with 'prompt' and 'answer'"),
    ([{"prompt": "q", "answer": "x"}], {"match": "fuzzy"}, "env.options.match='fuzzy' is not one of exact, numeric"),
])
def test_a_bad_jsonl_file_or_option_names_it(tmp_path, rows, options, says):
    path = write_tasks(tmp_path / "t.jsonl", rows)
    with pytest.raises(EnvError, match=says):
        load_env("jsonl", {"path": path, **options})


def test_jsonl_needs_its_path_and_sft_off_without_demonstrations(tmp_path):
    with pytest.raises(ConfigError, match="env jsonl needs env.options.path"):
        load_config(None, ["env.name=jsonl"])
    path = write_tasks(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "answer": "a"} for i in range(100)])
    with pytest.raises(ConfigError, match="env jsonl offers no SFT demonstrations"):
        load_config(None, ["env.name=jsonl", f"env.options.path={path}", "sft.difficulties=[1]",
                           "eval.difficulties=[1]", "stages=[{difficulty: 1, updates: 2}]", "data.eval_size=4",
                           "eval.size=4"])


# ---------------------------------------------------------------- the data layer for any environment


class Few(Environment):
    """Only three distinct items: sets bigger than that must be refused, not looped on forever."""
    name = "few"
    tiers = {1: "three items"}

    def make_record(self, rng, difficulty, split):
        return {"difficulty": difficulty, "n": rng.randint(1, 3)}

    def messages(self, record):
        return [{"role": "user", "content": str(record["n"])}]

    def parse(self, completion, record):
        return completion

    def fraction_right(self, prediction, record):
        return 0.0


def test_an_environment_that_runs_out_of_items_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(data, "MAX_REJECTS", 2000)
    with pytest.raises(data.DataError, match="only 3 distinct eval items"):
        data.eval_records(1, 5, env=Few())


def test_every_split_refuses_a_difficulty_the_environment_lacks():
    env = load_env("arithmetic")
    with pytest.raises(EnvError, match=r"difficulty must be a tier of arithmetic \(1-6\), got 7"):
        data.train_records(7, 2, env=env)
