"""Task environments: the built-in ones by name, a user's own as `package.module:Class`.

    env = load_env("arithmetic")
    env = load_env("mytasks.reverse:Reverse", {"alphabet": "abc"})   # a user's own, with its options
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import re
import sys

from picorl.envs.base import EnvError, Environment, check_environment

BUILTIN = {
    "letter_counting": "picorl.envs.letter_counting:LetterCounting",
    "arithmetic": "picorl.envs.arithmetic:Arithmetic",
    "jsonl": "picorl.envs.jsonl:JsonlTasks",
}
DEFAULT_ENV = "letter_counting"
_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def load_env(name: str = DEFAULT_ENV, options: dict | None = None) -> Environment:
    """The environment `name` with `options`, checked; one instance per (name, options)."""
    try:
        options_json = json.dumps(options or {}, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise EnvError(f"env.options must be plain values (text, numbers, lists, mappings): {e}") from None
    return _load(name, options_json)


def default_env() -> Environment:
    return load_env(DEFAULT_ENV)


def env_of(cfg) -> Environment:
    """The environment a run config names (`env.name`, `env.options`)."""
    return load_env(cfg.env.name, cfg.env.options)


def _import(module_name: str):
    """Import a user's module; one beside where the command runs is found too, as `python -m`
    would find it (the installed `picorl` script does not put that folder on sys.path)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        if e.name != module_name.split(".")[0] or here in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


@functools.lru_cache(maxsize=32)
def _load(name: str, options_json: str) -> Environment:
    spec = BUILTIN.get(name, name)
    if not isinstance(name, str) or not _SPEC.fullmatch(spec):
        raise EnvError(f"env.name={name!r} is neither a built-in environment ({', '.join(BUILTIN)}) "
                       "nor package.module:Class")
    module_name, cls_name = spec.split(":")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise EnvError(f"env.name={name!r}: cannot import {module_name} ({e}); run from the folder that "
                       "holds it, or put that folder on PYTHONPATH") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise EnvError(f"env.name={name!r}: {module_name} has no {cls_name}")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise EnvError(f"env.name={name!r}: {cls_name} is not a subclass of picorl.envs.base.Environment")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise EnvError(f"env.name={name!r}: {cls_name} does not implement {', '.join(missing)}")
    options = json.loads(options_json)
    try:
        env = cls(**options)
    except TypeError as e:  # an option the class does not take
        raise EnvError(f"env.options for {name}: {e}") from None
    return check_environment(env)
