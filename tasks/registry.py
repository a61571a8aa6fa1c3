"""The registry task: a run's final weights as an MLflow model (tracking/registry.py does it).

`TrainedModel` is importable from here too: models registered before tracking/ existed name
it by this module.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tracking.registry import TrainedModel, register

__all__ = ["TrainedModel", "register_final_model"]


@task(name="register-model", cache_policy=NO_CACHE)
def register_final_model(run: dict, name: str) -> dict:
    """Log the run's latest checkpoint as an MLflow model under the parent run; register it as `name`."""
    return register(run, name)
