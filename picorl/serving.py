"""A finished run's weights answering its environment's tasks: what a registered model serves.

    model, tok, cfg = load_trained(run_folder.config, run_folder.checkpoint(40))
    answers(model, tok, [{"string": "banana", "letters": ["a", "n"]}])
    -> [{"completion": "<think>b a1 n1 ...", "prediction": {"a": 3, "n": 2}}]
"""
from __future__ import annotations

from pathlib import Path

from picorl.checkpoint import load_model_weights
from picorl.config import load_config
from picorl.data import messages_of
from picorl.envs import default_env
from picorl.models import load_for_config
from picorl.rollout import Sampling
from picorl.session import build_engine


def load_trained(config_file, checkpoint_dir, device: str = "auto"):
    """(model, tokenizer, config) with the checkpoint's weights (a LoRA adapter or every weight)."""
    cfg = load_config(config_file)
    cfg.model.device = device
    model, tok = load_for_config(cfg)  # the base model, with a fresh adapter when the run used LoRA
    load_model_weights(model, Path(checkpoint_dir))
    return model.eval(), tok, cfg


def check_tasks(tasks, env=None) -> list[dict]:
    """The tasks as records the environment can prompt (letter counting's: {"string": str,
    "letters": [single characters]}); a ValueError names the first one that is not (what a
    served model gets is anyone's input)."""
    env = env or default_env()
    if isinstance(tasks, (str, bytes, dict)) or not hasattr(tasks, "__iter__"):
        raise ValueError(f"expected a list of tasks ({env.name}), got {type(tasks).__name__} {str(tasks)[:80]!r}")
    return [env.check_task(t, f"task {i}") for i, t in enumerate(tasks)]


def answers(model, tok, tasks: list[dict], max_tokens: int = 512, env=None) -> list[dict]:
    """Greedy completion and parsed prediction (the environment's parsing rule) for each task."""
    env = env or default_env()
    tasks = check_tasks(tasks, env)
    if type(max_tokens) is not int or max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
    groups = build_engine("hf", model, tok, progress=False).generate([messages_of(t, env) for t in tasks], 1,
                                                                   Sampling(temperature=0.0, max_tokens=max_tokens))
    return [{"completion": c.text, "prediction": env.parse(c.text, t)} for t, (c,) in zip(tasks, groups)]
