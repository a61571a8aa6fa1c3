"""Your own data file as an environment: prompts and reference answers, one JSON object a line.

    {"prompt": "What is the capital of France?", "answer": "Paris"}
    {"prompt": [{"role": "user", "content": "..."}], "answer": 12.5, "difficulty": 2, "demonstration": "..."}

`prompt` is the user's question (the system prompt asks for the answer in <answer></answer>
tags) or a whole chat; `answer` the reference. `difficulty` (1, 2, ... without gaps, on
every line or on none) gives the tiers a curriculum climbs; without it every line is tier 1.
`demonstration`, on every line, is the assistant's SFT target (style `given`); without it
the file offers no demonstrations and SFT must be off.

env.options:
    path            the file (required)
    eval_path       a second file of held-out items; without it, a fixed share of the lines
                    (by a hash of the prompt, so the same lines on any machine) is held out
    eval_fraction   that share (0.1)
    match           exact (after trimming and collapsing whitespace) or numeric
    tolerance       numeric: largest |prediction - answer| still right (1e-6)
    ignore_case     exact: compare case-insensitively (false)
    system_prompt   replaces the default system message of a text prompt
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from picorl.envs.base import EnvError, Environment, answer_body

SYSTEM_PROMPT = "Think step by step, then give the final answer wrapped in <answer></answer> tags."
MATCHES = ("exact", "numeric")


def _normal(text: str, ignore_case: bool) -> str:
    text = " ".join(str(text).split())
    return text.lower() if ignore_case else text


def _number(text) -> float | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    text = str(text).strip()
    if not text or len(text) > 100:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _check_chat(prompt, where: str) -> None:
    if not prompt or not all(isinstance(m, dict) and set(m) == {"role", "content"} and
                             m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                             for m in prompt):
        raise EnvError(f"{where}: a 'prompt' list must be chat messages {{'role': system|user|assistant, "
                       "'content': text}}")


class JsonlTasks(Environment):
    """Prompts and reference answers from a JSONL file; exact or numeric match."""

    name = "jsonl"
    splits = ("train", "eval")

    def __init__(self, path: str | None = None, eval_path: str | None = None, eval_fraction: float = 0.1,
                 match: str = "exact", tolerance: float = 1e-6, ignore_case: bool = False,
                 system_prompt: str = SYSTEM_PROMPT):
        if not path:
            raise EnvError("env jsonl needs env.options.path: the JSONL file of prompts and answers")
        if match not in MATCHES:
            raise EnvError(f"env.options.match={match!r} is not one of {', '.join(MATCHES)}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise EnvError(f"env.options.tolerance={tolerance!r} must be a number >= 0")
        if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or \
                not 0 < eval_fraction < 1:
            raise EnvError(f"env.options.eval_fraction={eval_fraction!r} must be in (0, 1)")
        if not isinstance(system_prompt, str):
            raise EnvError(f"env.options.system_prompt must be text, got {system_prompt!r}")
        self.match, self.tolerance, self.ignore_case = match, float(tolerance), bool(ignore_case)
        self.system_prompt = system_prompt
        self._with_difficulty: set[bool] = set()
        rows = self._read(Path(path))
        if eval_path:
            train, held = rows, self._read(Path(eval_path))
        else:
            held = [r for r in rows if self._held_out_share(r) < eval_fraction]
            train = [r for r in rows if self._held_out_share(r) >= eval_fraction]
        if not train or not held:
            raise EnvError(f"{path}: {len(train)} training and {len(held)} held-out lines; both splits need some "
                           "(a bigger file, or eval_path)")
        if len(self._with_difficulty) > 1:
            raise EnvError(f"{path}: 'difficulty' must be on every line or on none")
        self.by_split = {"train": self._by_difficulty(train), "eval": self._by_difficulty(held)}
        found = sorted(set(self.by_split["train"]) | set(self.by_split["eval"]))
        if found != list(range(1, len(found) + 1)):
            raise EnvError(f"{path}: difficulties must run 1, 2, ... without gaps, found {found}")
        self.tiers = {d: f"difficulty {d}" for d in found}
        self.demo_styles = ("given",) if all("demonstration" in r for r in train) else ()

    def _read(self, path: Path) -> list[dict]:
        if not path.is_file():
            raise EnvError(f"env.options: data file not found: {path}")
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EnvError(f"{where}: not valid JSON ({e.msg})") from None
            try:
                rows.append(self._check_row(row, where))
            except ValueError as e:
                raise EnvError(str(e)) from None
            self._with_difficulty.add("difficulty" in row)
        if not rows:
            raise EnvError(f"{path}: no lines")
        return rows

    def _check_row(self, row, where: str) -> dict:
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise ValueError(f"{where}: expected an object with 'prompt' and 'answer', got {str(row)[:120]!r}")
        prompt = row["prompt"]
        if isinstance(prompt, list):
            _check_chat(prompt, where)
        elif not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be non-empty text or a list of chat messages")
        if self.match == "numeric" and _number(row["answer"]) is None:
            raise ValueError(f"{where}: match is numeric but 'answer' {row['answer']!r} is not a finite number")
        if isinstance(row["answer"], bool) or not isinstance(row["answer"], (str, int, float)):
            raise ValueError(f"{where}: 'answer' must be text or a number, got {row['answer']!r}")
        d = row.get("difficulty", 1)
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{where}: 'difficulty' must be a whole number >= 1, got {d!r}")
        if "demonstration" in row and not isinstance(row["demonstration"], str):
            raise ValueError(f"{where}: 'demonstration' must be text")
        return {"difficulty": d, **{k: row[k] for k in ("prompt", "answer", "demonstration") if k in row}}

    @staticmethod
    def _held_out_share(row: dict) -> float:
        digest = hashlib.sha256(json.dumps(row["prompt"], sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64

    def _by_difficulty(self, rows: list[dict]) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for r in rows:
            out.setdefault(r["difficulty"], []).append(r)
        return out

    # ------------------------------------------------------------ the interface

    def make_record(self, rng, difficulty, split):
        rows = self.by_split[split].get(self.check_difficulty(difficulty))
        if not rows:
            raise EnvError(f"env jsonl: no {split} lines at difficulty {difficulty}")
        return dict(rng.choice(rows))

    def messages(self, record):
        prompt = record["prompt"]
        if isinstance(prompt, list):
            return [dict(m) for m in prompt]
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]

    def parse(self, completion, record):
        body = answer_body(completion)
        if body is None:
            return None
        if self.match == "numeric":
            return _number(body)
        return _normal(body, self.ignore_case)

    def fraction_right(self, prediction, record):
        if self.match == "numeric":
            return float(abs(prediction - _number(record["answer"])) <= self.tolerance)
        return float(prediction == _normal(record["answer"], self.ignore_case))

    def demonstration(self, record, style, tokenizer=None):
        if not self.demo_styles:
            return super().demonstration(record, style, tokenizer)  # raises: SFT must be off
        if style != "given":
            raise EnvError(f"sft.style must be 'given' for jsonl (the file's demonstrations), got {style!r}")
        return record["demonstration"]

    def key(self, record):
        return json.dumps(record["prompt"], sort_keys=True)

    def capacity(self, difficulty, split):
        return len({self.key(r) for r in self.by_split[split].get(self.check_difficulty(difficulty), [])})

    def check_record(self, record, where):
        record = self._check_row(record, where) | {k: v for k, v in record.items() if k == "messages"}
        return super().check_record(record, where)
