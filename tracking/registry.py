"""A run's final weights as an MLflow model in the registry, and back.

The model is a pyfunc: its artifacts are the run's config.yaml and final checkpoint, and
`predict` answers the run's environment's tasks greedily (picorl/serving.py). MLflow's own loader
serves it:

    model = mlflow.pyfunc.load_model("models:/picorl-smollm2/1")
    model.predict([{"string": "banana", "letters": ["a", "n"]}])
    -> [{"completion": "...", "prediction": {"a": 3, "n": 2}}]
"""
from __future__ import annotations

from pathlib import Path

import mlflow

from picorl import checkpoint
from picorl.run_folder import RunFolder
from tracking import runs


class TrainedModel(mlflow.pyfunc.PythonModel):
    """A run's weights; its config names the environment whose tasks it answers."""

    def load_context(self, context):
        from picorl.envs import env_of
        from picorl.serving import load_trained
        self.model, self.tok, self.cfg = load_trained(context.artifacts["config"], context.artifacts["checkpoint"])
        self.env = env_of(self.cfg)

    def predict(self, context, model_input, params=None):
        from picorl.serving import answers
        tasks = model_input.to_dict("records") if hasattr(model_input, "to_dict") else model_input
        max_tokens = (params or {}).get("max_tokens") or self.cfg.eval.max_tokens
        return answers(self.model, self.tok, tasks, max_tokens=int(max_tokens), env=self.env)


def signature(default_max_tokens: int, env_name: str = "letter_counting"):
    """The max_tokens param, and for letter counting the inputs {string, letters}: MLflow checks
    both before predict, and without a params schema it would drop max_tokens with a warning.
    Another environment's tasks are checked by the environment itself (`check_task`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema
    inputs = Schema([ColSpec("string", "string"), ColSpec(Array("string"), "letters")]) \
        if env_name == "letter_counting" else None
    return ModelSignature(inputs=inputs, params=ParamSchema([ParamSpec("max_tokens", "long", default_max_tokens)]))


def register(run: dict, name: str) -> dict:
    """Log the run's latest checkpoint as an MLflow model under the parent run; register it as `name`.
    `run` is the flow's run handle (its config is the run's)."""
    from picorl.config import config_from_dict

    folder = RunFolder(run["run_dir"])
    final = checkpoint.latest_checkpoint(folder.checkpoints)
    if final is None:
        raise FileNotFoundError(f"no checkpoint under {folder.checkpoints} to register")
    mlflow.set_tracking_uri(runs.tracking_uri())
    cfg = config_from_dict(run["config"])
    with mlflow.start_run(run_id=run["parent_run_id"]):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=TrainedModel(), registered_model_name=name,
            signature=signature(cfg.eval.max_tokens, cfg.env.name),
            artifacts={"config": str(folder.config), "checkpoint": str(final)},
            pip_requirements=["picorl", "torch", "transformers", "peft"])
    return {"name": name, "version": str(info.registered_model_version), "checkpoint": final.name}


def download_registered(uri: str, into) -> tuple[Path, Path]:
    """(config.yaml, checkpoint folder) of a registered model `models:/<name>/<version>`, downloaded."""
    mlflow.set_tracking_uri(runs.tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    return local / "artifacts" / "config.yaml", next(p for p in (local / "artifacts").iterdir() if p.is_dir())
