"""A finished run's weights as a letter-counting answerer: what a registered model serves.

    model, tok, cfg = load_trained(run_folder.config, run_folder.checkpoint(40))
    answers(model, tok, [{"string": "banana", "letters": ["a", "n"]}])
    -> [{"completion": "<think>b a1 n1 ...", "prediction": {"a": 3, "n": 2}}]
"""
from __future__ import annotations

from pathlib import Path

from picorl.checkpoint import load_model_weights
from picorl.config import load_config
from picorl.data import messages_of
from picorl.envs.letter_counting import parse_answer
from picorl.models import load_for_config
from picorl.rollout import Sampling


def load_trained(config_file, checkpoint_dir, device: str = "auto"):
    """(model, tokenizer, config) with the checkpoint's weights (a LoRA adapter or every weight)."""
    cfg = load_config(config_file)
    cfg.model.device = device
    model, tok = load_for_config(cfg)  # the base model, with a fresh adapter when the run used LoRA
    load_model_weights(model, Path(checkpoint_dir))
    return model.eval(), tok, cfg


def check_tasks(tasks) -> list[dict]:
    """The tasks as {"string": str, "letters": [single characters]} records; a ValueError names
    the first one that is not (what a served model gets is anyone's input)."""
    if isinstance(tasks, (str, bytes, dict)) or not hasattr(tasks, "__iter__"):
        raise ValueError(f"expected a list of tasks like [{{'string': 'banana', 'letters': ['a', 'n']}}], "
                         f"got {type(tasks).__name__} {str(tasks)[:80]!r}")
    out = []
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or "string" not in t or "letters" not in t:
            raise ValueError(f"task {i}: expected {{'string': ..., 'letters': [...]}}, got {str(t)[:120]!r}")
        string, letters = t["string"], t["letters"]
        if not isinstance(string, str) or not string:
            raise ValueError(f"task {i}: 'string' must be a non-empty string, got {string!r}")
        letters = list(letters) if not isinstance(letters, str) and hasattr(letters, "__iter__") else letters
        if not isinstance(letters, list) or not letters or \
                not all(isinstance(c, str) and len(c) == 1 for c in letters) or len(set(letters)) != len(letters):
            raise ValueError(f"task {i}: 'letters' must be a non-empty list of distinct single characters, "
                             f"got {t['letters']!r}")
        out.append({"string": string, "letters": letters})
    return out


def answers(model, tok, tasks: list[dict], max_tokens: int = 512) -> list[dict]:
    """Greedy completion and parsed prediction for each {"string", "letters"} task."""
    from picorl.rollout.hf import HFEngine

    tasks = check_tasks(tasks)
    if type(max_tokens) is not int or max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
    groups = HFEngine(model, tok, progress=False).generate([messages_of(t) for t in tasks], 1,
                                                         Sampling(temperature=0.0, max_tokens=max_tokens))
    return [{"completion": c.text, "prediction": parse_answer(c.text, t["letters"]).counts}
            for t, (c,) in zip(tasks, groups)]
