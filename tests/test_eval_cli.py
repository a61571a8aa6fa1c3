import json
import subprocess
import sys

import pytest

from picorl import data


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)


def test_eval_reports_bad_line_and_writes_nothing(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({"string": "ab", "letters": ["a"], "answer": {"a": 1}}) + "\n{oops\n")
    out = tmp_path / "out.jsonl"
    r = run_cli("eval", "--model", "tiny-random-llama", "--data", str(p), "--out", str(out))
    assert r.returncode == 2 and "in.jsonl:2" in r.stderr
    assert not out.exists()


def test_eval_missing_adapter_says_what_was_looked_for(tmp_path):
    p = tmp_path / "in.jsonl"
    data.write_jsonl(data.eval_records(1, 2), p)
    r = run_cli("eval", "--model", "tiny-random-llama", "--adapter", str(tmp_path / "nope"),
                "--data", str(p), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "adapter_config.json not found" in r.stderr and "nope" in r.stderr


@pytest.mark.slow
def test_eval_on_embedded_model_end_to_end(tmp_path):
    src = [{k: r[k] for k in ("string", "letters", "answer", "difficulty")} for r in data.eval_records(1, 6)]
    p = tmp_path / "in.jsonl"
    data.write_jsonl(src, p)
    out = tmp_path / "out.jsonl"
    r = run_cli("eval", "--data", str(p), "--out", str(out), "--max-tokens", "24", "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    # letter counting reads the working, so the summary carries `reasoned` beside `exact`
    assert set(summary) == {"exact", "partial", "formatted", "reasoned", "n"} and summary["n"] == 6
    items = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(items) == 6
    for s, i in zip(src, items):
        assert {k: i[k] for k in s} == s and isinstance(i["completion"], str) and i["completion"]
        assert "prediction" in i and i["exact"] in (0.0, 1.0)
    assert summary["exact"] == sum(i["exact"] for i in items) / 6
    assert summary["reasoned"] == sum(i["reasoned"] for i in items) / 6 <= summary["exact"]


def write_records(tmp_path, records, name="in.jsonl"):
    p = tmp_path / name
    data.write_jsonl(records, p)
    return p


@pytest.mark.parametrize("args,msg", [
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--samples", "-1"], "--samples must be >= 0, got -1"),
    (["--samples", "2", "--temperature", "0"], "--temperature must be a finite number > 0 to sample, got 0.0"),
    (["--samples", "2", "--seed", "-3"], "--seed must be in [0, 2**32), got -3"),
    (["--max-tokens", "1000000000"], "--max-tokens 1000000000 leaves no room for a prompt in the model's context "
                                     "of 4096 tokens"),
])
def test_eval_bad_numbers_are_one_line(tmp_path, args, msg):
    r = run_cli("eval", "--model", "tiny-random-llama", "--data", str(write_records(tmp_path, data.eval_records(1, 2))),
                "--out", str(tmp_path / "o.jsonl"), *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_into_a_missing_folder_fails_before_any_work(tmp_path):
    r = run_cli("eval", "--model", "does-not-exist", "--data", str(tmp_path / "nope.jsonl"),
                "--out", str(tmp_path / "missing" / "o.jsonl"))
    # The output folder is checked first: neither the missing data nor the model was looked at.
    assert r.returncode == 2 and "folder" in r.stderr and "missing" in r.stderr and "nope.jsonl" not in r.stderr


@pytest.mark.parametrize("content,msg", [
    (b"\xff\xfe\x00binary", "not a UTF-8 text file"),
    (json.dumps({"string": "aab", "letters": ["a", "a"], "answer": {"a": 2}}).encode() + b"\n", "names a letter twice"),
])
def test_eval_bad_data_files_are_one_line(tmp_path, content, msg):
    p = tmp_path / "in.jsonl"
    p.write_bytes(content)
    r = run_cli("eval", "--model", "tiny-random-llama", "--data", str(p), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("config,weights,msg", [
    ("{not json", None, "adapter_config.json: not valid JSON"),
    ('{"r": 4, "target_modules": ["q_proj"]}', b"garbage", "adapter_model.safetensors: not a safetensors file"),
    ('{"hello": 1}', None, "not a LoRA adapter config"),
])
def test_eval_bad_adapters_are_one_line(tmp_path, config, weights, msg):
    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text(config)
    (a / "adapter_model.safetensors").write_bytes(weights or b"")
    r = run_cli("eval", "--model", "tiny-random-llama", "--adapter", str(a),
                "--data", str(write_records(tmp_path, data.eval_records(1, 2))), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_eval_on_cuda_without_cuda_is_one_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_cli("eval", "--model", "tiny-random-llama", "--device", "cuda",
                "--data", str(write_records(tmp_path, data.eval_records(1, 2))), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "no CUDA device is available" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_samples_beside_greedy(tmp_path):
    """--samples K: the summary gains sampled accuracy and pass@K, each item its fraction of
    right samples; the greedy half is the eval without samples, and the seed repeats the samples."""
    src = write_records(tmp_path, data.eval_records(1, 4))
    outs = []
    for name, extra in (("greedy", []), ("a", ["--samples", "3"]), ("b", ["--samples", "3"])):
        out = tmp_path / f"{name}.jsonl"
        r = run_cli("eval", "--model", "tiny-random-llama", "--data", str(src), "--out", str(out),
                    "--max-tokens", "6", *extra)
        assert r.returncode == 0, r.stderr
        outs.append((json.loads(r.stdout.strip().splitlines()[-1]), data.read_jsonl(out)))
    (g_sum, greedy), (s_sum, sampled), (_, again) = outs
    assert set(g_sum) == {"exact", "partial", "formatted", "reasoned", "n"}
    assert set(s_sum) == set(g_sum) | {"sampled", "pass_at_k"}
    assert [i["completion"] for i in sampled] == [i["completion"] for i in greedy]
    assert all(i["sampled"] in (0.0, 1 / 3, 2 / 3, 1.0) for i in sampled)
    assert [i["sampled"] for i in again] == [i["sampled"] for i in sampled]
    assert s_sum["sampled"] == pytest.approx(sum(i["sampled"] for i in sampled) / 4)
