"""A config loaded, validated and checked against this machine before any work.

    cfg = checked_config("configs/default.yaml", ["grpo.lr=1e-5"])   # ConfigError names what is wrong

Every entry point that starts a run calls this once: `picorl train` before it imports Prefect
(so a bad value fails in a second), a deployment's flow run when no command line came before
it. From there the resolved config travels with the run (flows/train.py); nothing reads the
YAML again but a resumed run, whose config is its folder's.
"""
from __future__ import annotations

from picorl.config import Config, ConfigError, load_config
from picorl.run_folder import output_dir_problem


def model_problem(cfg: Config) -> str | None:
    """Why the config's model cannot be loaded here (not found, a bad LoRA target or rank, no
    such device), read from the model's config without loading weights; None when it can."""
    from picorl import models

    try:
        models.check_model_for_config(cfg)
    except (models.ModelNotFoundError, models.BadModelError, models.NoDeviceError) as e:
        return str(e)
    return None


def check_config(cfg: Config, *, resume: bool = False) -> None:
    """The model resolves and fits the LoRA settings, and (for a new run) the output folder can
    be written; a ConfigError otherwise. A resumed run writes into its existing folder."""
    problem = model_problem(cfg) or (None if resume else output_dir_problem(cfg.run.output_dir))
    if problem:
        raise ConfigError(problem)


def checked_config(config_path=None, overrides: list[str] | None = None, *, resume: bool = False) -> Config:
    """load_config (YAML + overrides, validated), then check_config."""
    cfg = load_config(config_path, overrides)
    check_config(cfg, resume=resume)
    return cfg
