import json
import subprocess
import sys

import pytest

from picorl import data


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "picorl.cli", *args], capture_output=True, text=True)


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
    assert set(summary) == {"exact", "partial", "formatted", "n"} and summary["n"] == 6
    items = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(items) == 6
    for s, i in zip(src, items):
        assert {k: i[k] for k in s} == s and isinstance(i["completion"], str) and i["completion"]
        assert "prediction" in i and i["exact"] in (0.0, 1.0)
    assert summary["exact"] == sum(i["exact"] for i in items) / 6
