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


def answers(model, tok, tasks: list[dict], max_tokens: int = 512) -> list[dict]:
    """Greedy completion and parsed prediction for each {"string", "letters"} task."""
    from picorl.rollout.hf import HFEngine

    groups = HFEngine(model, tok, progress=False).generate([messages_of(t) for t in tasks], 1,
                                                         Sampling(temperature=0.0, max_tokens=max_tokens))
    return [{"completion": c.text, "prediction": parse_answer(c.text, list(t["letters"])).counts}
            for t, (c,) in zip(tasks, groups)]
