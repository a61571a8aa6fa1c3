"""The process-wide model and engine cache, and the one place that builds rollout engines.

Training, evals, export, serving and the benches all get their engine from `build_engine`
(by name) or from a config through `engine_for_config` / `eval_engine`:

    engine = engine_for_config(cfg, model, tok)      # rollout.engine, with the rollout section's knobs
    engine = eval_engine(cfg, model, tok)            # greedy evals: graph when the run trains with it, else hf
    engine = build_engine("hf", model, tok)          # a plain transformers engine (picorl eval, serving)

A `Session` keeps one loaded model, its engine and its trainer across the pipeline's steps, so
consecutive Prefect tasks in one process load the 135M model once, not once per task.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from picorl import checkpoint, data
from picorl.config import Config, to_dict
from picorl.rollout.base import RolloutEngine
from picorl.run_folder import RunFolder

def build_engine(kind: str, model, tokenizer, *, batch_size: int = 64, progress: bool = True,
                 hf_cache: str = "dynamic", hf_compile: bool = False, graph_compile: bool = False,
                 compact: bool = True, graph_dtype: torch.dtype | None = None, **vllm_options) -> RolloutEngine:
    """The engine named `kind` (`rollout.engine`: hf, graph or vllm) around a loaded model.

    hf_cache / hf_compile apply to hf, graph_compile / compact / graph_dtype to graph; vllm
    takes its own options (model_path, gpu_memory_utilization, max_model_len, lora_rank,
    dtype, seed)."""
    if kind == "hf":
        from picorl.rollout.hf import HFEngine
        return HFEngine(model, tokenizer, batch_size=batch_size, progress=progress, cache=hf_cache, compile=hf_compile)
    if kind == "graph":
        from picorl.rollout.graph import GraphEngine
        return GraphEngine(model, tokenizer, batch_size=batch_size, progress=progress, compile_step=graph_compile,
                           compact=compact, dtype=graph_dtype)
    if kind == "vllm":
        try:
            from picorl.rollout.vllm import VLLMEngine
        except ImportError as e:
            raise RuntimeError(f"rollout.engine=vllm is not available here: {e}") from None
        return VLLMEngine(model, tokenizer, progress=progress, **vllm_options)
    raise ValueError(f"rollout.engine must be 'hf', 'graph' or 'vllm', got {kind!r}")


def engine_for_config(cfg: Config, model, tokenizer, progress: bool = True) -> RolloutEngine:
    """The rollout engine a config's `rollout` section names, around an already-loaded model."""
    r = cfg.rollout
    options = dict(batch_size=r.batch_size, progress=progress, hf_cache=r.hf_cache, hf_compile=r.hf_compile,
                   graph_compile=r.graph_compile)
    if r.engine == "graph":
        from picorl.models import rollout_dtype
        options["graph_dtype"] = rollout_dtype(r.dtype, model)
    if r.engine == "vllm":
        from picorl.models import resolve_model
        options.update(model_path=resolve_model(cfg.model.name), gpu_memory_utilization=r.gpu_memory_utilization,
                       max_model_len=r.max_model_len, lora_rank=cfg.model.lora.rank, dtype=cfg.model.dtype,
                       seed=cfg.run.seed)
    return build_engine(r.engine, model, tokenizer, **options)


def eval_engine(cfg: Config, model, tokenizer, progress: bool = True) -> RolloutEngine:
    """The greedy engine of evals: the graph engine when the run trains with it (its greedy
    tokens equal transformers', tests/test_graph_engine.py), else transformers with the run's
    cache and compile switches (the reference measurement, whatever trains). Always in the
    model's dtype, whatever `rollout.dtype` samples in: an eval scores the weights a
    checkpoint holds, as `picorl eval` of the exported adapter would."""
    if cfg.rollout.engine == "graph":
        return build_engine("graph", model, tokenizer, batch_size=cfg.eval.batch_size, progress=progress)
    return build_engine("hf", model, tokenizer, batch_size=cfg.eval.batch_size, progress=progress,
                        hf_cache=cfg.rollout.hf_cache, hf_compile=cfg.rollout.hf_compile)


class Session:
    """The loaded model, tokenizer, engine and trainer, shared by consecutive steps.

    `loaded` names the checkpoint the in-memory weights equal; anything else (a failure
    mid-update, a different checkpoint) makes the next step reload from disk. The steps say
    what they did (`training_started`, `diverged`, `saved`); only the session sets its fields.
    """
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = self.tokenizer = self.engine = self.trainer = None
        self.loaded: str | None = None
        self.pristine = False  # base weights + a fresh adapter, untouched
        self._records: dict = {}
        self._evals = None  # (model, its eval engine) when evals need their own (rollout.dtype)

    def fresh(self) -> None:
        """Base weights and a new adapter (a retried SFT must not continue a half-trained one)."""
        if self.pristine:
            return
        from picorl.models import load_for_config

        self.model, self.tokenizer = load_for_config(self.cfg)
        self.engine = engine_for_config(self.cfg, self.model, self.tokenizer)
        self.trainer, self.loaded, self.pristine = None, None, True

    def reconfigure(self, cfg: Config) -> None:
        """Another config of the same model: the weights stay, the engine (if the rollout
        section changed) and the trainer are built for `cfg`, and the next step restores its
        checkpoint (the trainer's state is that checkpoint's, not this memory's)."""
        if self.engine is not None and cfg.rollout != self.cfg.rollout:
            self.engine = engine_for_config(cfg, self.model, self.tokenizer)
        self.cfg, self.trainer, self.loaded = cfg, None, None

    def training_started(self) -> None:
        """The fresh weights are about to change: a retry after a failure must reload them."""
        self.pristine = False

    def diverged(self) -> None:
        """Memory no longer equals any checkpoint (updates are running)."""
        self.loaded = None

    def saved(self, ckpt: Path) -> None:
        """Memory equals checkpoint `ckpt`, just written."""
        self.loaded = str(ckpt)

    def holds(self, ckpt: Path) -> bool:
        return self.loaded == str(ckpt)

    def records(self, run_dir, split: str, difficulty: int) -> list[dict]:
        """A data set of the run folder, read once (a run's data sets do not change)."""
        key = (str(run_dir), split, difficulty)
        if key not in self._records:
            self._records[key] = data.load_records(RunFolder(run_dir).dataset(split, difficulty))
        return self._records[key]

    def eval_engine(self, progress: bool = True) -> RolloutEngine:
        """The rollout engine when it is the graph engine in the model's dtype (synced weights,
        captured graphs); a graph engine of the model's dtype beside a bf16 one (`rollout.dtype`),
        built once per loaded model and synced at each eval; else a new hf one."""
        if self.cfg.rollout.engine != "graph":
            return eval_engine(self.cfg, self.model, self.tokenizer, progress)
        from picorl.models import rollout_dtype
        if rollout_dtype(self.cfg.rollout.dtype, self.model) is None:
            return self.engine
        if self._evals is None or self._evals[0] is not self.model:
            self._evals = (self.model, eval_engine(self.cfg, self.model, self.tokenizer, progress))
        self._evals[1].sync_weights(self.model)
        return self._evals[1]

    def get_trainer(self):
        from picorl.trainer import GRPOTrainer
        if self.trainer is None:
            self.trainer = GRPOTrainer(self.model, self.tokenizer, self.engine, self.cfg)
        return self.trainer

    def restore(self, ckpt: Path) -> tuple[dict, dict]:
        """Make memory equal checkpoint `ckpt` (every trained weight, optimizer and the trainer's
        step, RNG)."""
        if self.model is None:
            self.fresh()
        state, info = checkpoint.load_checkpoint(ckpt, self.model)
        if "optimizer" in state:
            self.get_trainer().load_state_dict(state)
        self.engine.sync_weights(self.model)
        self.loaded, self.pristine = str(ckpt), False
        return state, info


_SESSIONS: dict[str, Session] = {}


def model_key(cfg: Config) -> str:
    """What loading a config's model depends on (`models.load_for_config`): the model section,
    and the seed a new adapter is drawn with."""
    return json.dumps([to_dict(cfg.model), cfg.run.seed], sort_keys=True, default=str)


def session_for(cfg: Config) -> Session:
    """The session holding `cfg`'s model: the same one while the model does not change. Another
    config with the same model keeps the loaded weights and gets its own engine and trainer."""
    key = model_key(cfg)
    if key not in _SESSIONS:
        _SESSIONS.clear()  # one model in memory at a time
        _SESSIONS[key] = Session(cfg)
    sess = _SESSIONS[key]
    if sess.cfg != cfg:
        sess.reconfigure(cfg)
    return sess


def clear_sessions() -> None:
    _SESSIONS.clear()
