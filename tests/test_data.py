import json
import subprocess
import sys

import pytest

from picorl import data


def test_same_seed_same_records_and_seeds_differ():
    a = data.train_records(4, 50, seed=7)
    assert a == data.train_records(4, 50, seed=7)
    assert a != data.train_records(4, 50, seed=8)


def test_records_are_identical_in_another_process():
    code = ("import json; from picorl import data; "
            "print(json.dumps(data.train_records(6, 20, seed=3) + data.eval_records(2, 20)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout for h in (1, 2)}
    assert len(outs) == 1
    assert json.loads(outs.pop()) == data.train_records(6, 20, seed=3) + data.eval_records(2, 20)


@pytest.mark.parametrize("difficulty", [1, 3, 6])
def test_no_eval_string_in_training_data(difficulty):
    held_out = {r["string"] for r in data.eval_records(difficulty, data.EVAL_POOL)}
    for seed in range(3):
        train = data.train_records(difficulty, 2000, seed=seed)
        assert not held_out & {r["string"] for r in train}


def test_eval_sets_are_fixed_prefixes_and_distinct():
    small, big = data.eval_records(5, 16), data.eval_records(5, 128)
    assert big[:16] == small
    assert len({r["string"] for r in big}) == 128
    assert data.eval_records(5, 16, seed=99) != small  # another seed is a fresh set


@pytest.mark.parametrize("difficulty", [3, 6])
def test_fresh_sets_hold_strings_the_pipeline_never_generates(difficulty):
    fresh = data.generate("fresh", difficulty, 128, seed=0)
    assert fresh == data.fresh_records(difficulty, 128) != data.fresh_records(difficulty, 128, seed=1)
    strings = {r["string"] for r in fresh}
    assert len(strings) == 128
    assert not strings & {r["string"] for r in data.eval_records(difficulty, data.EVAL_POOL)}
    if difficulty == 6:  # random strings: a training set repeating one would be a namespace bug
        assert not strings & {r["string"] for r in data.train_records(difficulty, 2000)}
    for r in fresh:
        assert r["answer"] == {c: r["string"].count(c) for c in r["letters"]} and r["difficulty"] == difficulty


def test_records_carry_fields_and_true_answers():
    for r in data.train_records(7, 30):
        assert set(r) == {"difficulty", "string", "letters", "answer", "messages"}
        assert r["answer"] == {c: r["string"].count(c) for c in r["letters"]}
        assert r["messages"][-1]["role"] == "user" and r["string"] in r["messages"][-1]["content"]


def test_dataset_round_trip(tmp_path):
    recs = data.train_records(3, 40) + data.train_records(6, 40)
    data.save_dataset(recs, tmp_path / "train")
    assert data.load_records(tmp_path / "train") == recs
    data.save_dataset(recs[:5], tmp_path / "train")  # overwriting replaces
    assert data.load_records(tmp_path / "train") == recs[:5]


def test_jsonl_round_trip_and_minimal_records(tmp_path):
    recs = data.eval_records(2, 10)
    data.write_jsonl(recs, tmp_path / "x.jsonl")
    assert data.read_jsonl(tmp_path / "x.jsonl") == recs
    minimal = [{k: r[k] for k in ("string", "letters", "answer")} for r in recs]
    data.write_jsonl(minimal, tmp_path / "m.jsonl")
    rebuilt = data.read_jsonl(tmp_path / "m.jsonl")
    assert rebuilt == minimal
    assert [data.messages_of(r) for r in rebuilt] == [r["messages"] for r in recs]


@pytest.mark.parametrize("line,msg", [
    ("not json", "not valid JSON"),
    ('{"string": "ab", "letters": ["a"]}', "missing field 'answer'"),
    ('{"string": "ab", "letters": ["a"], "answer": {"b": 1}}', "'answer' must map"),
    ('{"string": "ab", "letters": "a", "answer": {"a": 1}}', "'letters' must be"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_lines_are_named(tmp_path, line, msg):
    good = json.dumps({"string": "ab", "letters": ["a"], "answer": {"a": 1}})
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n" + good + "\n" + line + "\n")
    with pytest.raises(data.DataError, match=f"bad.jsonl:3: .*{msg}"):
        data.read_jsonl(p)


def test_a_record_whose_prompt_no_longer_asks_its_question_is_refused(tmp_path):
    # `picorl gen` writes each record's prompt; editing the string and answer but not the
    # prompt would grade the new answer against an answer to the old question.
    (rec,) = data.eval_records(3, 1)
    edited = {**rec, "string": "banana", "letters": ["a"], "answer": {"a": 3}}
    data.write_jsonl([rec, edited], tmp_path / "edited.jsonl")
    with pytest.raises(data.DataError, match="edited.jsonl:2: 'messages' is not the prompt of its 'string' and 'letters'"):
        data.read_jsonl(tmp_path / "edited.jsonl")
    del edited["messages"]  # rebuilt from the fields, as the error says
    data.write_jsonl([rec, edited], tmp_path / "fixed.jsonl")
    assert "banana" in data.messages_of(data.read_jsonl(tmp_path / "fixed.jsonl")[1])[-1]["content"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.jsonl"
    p.write_text("old\n")

    class Boom(Exception):
        pass

    def bad_dumps(*a, **k):
        raise Boom()
    monkeypatch.setattr(data.json, "dumps", bad_dumps)
    with pytest.raises(Boom):
        data.write_jsonl([{"x": 1}], p)
    assert p.read_text() == "old\n"
    assert [f.name for f in tmp_path.iterdir()] == ["a.jsonl"]
