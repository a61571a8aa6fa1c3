"""The pipeline's steps as plain functions over a run folder (picorl/run_folder.py); the
Prefect tasks call these.

Every step is idempotent: it starts from the latest checkpoint and returns at once when
that checkpoint already covers it, so a retry or a resume continues where work stopped.
`history.jsonl` inside each checkpoint lists every metric row up to that checkpoint; the
tracking layer logs the rows it has not logged yet, so each step is logged exactly once.
"""
from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch

from picorl import checkpoint, data
from picorl.config import Config, ConfigError, dump_yaml, flatten, load_config, to_dict
from picorl.curriculum import Curriculum
from picorl.distributed import barrier, rank_and_world
from picorl.envs import env_of
from picorl.evaluate import changes_by_difficulty, evaluate_sets
from picorl.faults import fault_point
from picorl.files import atomic_write_text
from picorl.machine import machine_name
from picorl.metrics import eval_metrics
from picorl.plan import Chunk, train_difficulties
from picorl.rollout.hf import HFEngine
from picorl.run_folder import RunFolder
from picorl.sft import train_sft

MAX_SKIPS_IN_A_ROW = 5


class NumericalError(RuntimeError):
    """Too many non-finite updates in a row; the run stopped at a checkpoint."""


# ---------------------------------------------------------------- run folder


def prepare_run_dir(cfg: Config, run_dir) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run_dir)
    # The lock first: a config.yaml without one is an older run, read as it is.
    atomic_write_text(folder.config_lock, json.dumps(flatten(to_dict(cfg)), indent=1, default=str))
    atomic_write_text(folder.config, dump_yaml(cfg))
    return run_dir


def run_config(run_dir) -> Config:
    """The config a run folder was started with. A config.yaml edited since is refused, naming
    the keys: MLflow's params, the data and the checkpoints all follow from the first one, and a
    resume that trained 50 updates where the run's record says 2 would contradict them."""
    folder = RunFolder(run_dir)
    cfg = load_config(folder.config)
    if folder.config_lock.is_file():
        started = json.loads(folder.config_lock.read_text())
        now = json.loads(json.dumps(flatten(to_dict(cfg)), default=str))
        changed = [f"{k} ({started.get(k, 'not set')!r} -> {now.get(k, 'not set')!r})"
                   for k in sorted(set(started) | set(now)) if started.get(k) != now.get(k)]
        if changed:
            raise ConfigError(f"{folder.config} was edited after the run started: {', '.join(changed)}. "
                              "A run keeps the config it started with (its MLflow params and checkpoints "
                              "follow from it): put the file back, or start a new run with the new values")
    return cfg


def read_history(run_dir) -> list[dict]:
    latest = checkpoint.latest_checkpoint(RunFolder(run_dir).checkpoints)
    return [] if latest is None else checkpoint.read_history(latest)


def eval_rows(run_dir) -> list[dict]:
    """Eval metric rows from evals/step_N.json, oldest first."""
    return [eval_row(json.loads(p.read_text())) for p in RunFolder(run_dir).eval_files().values()]


def grpo_gains(run_dir) -> dict[str, dict]:
    """Per eval difficulty: the final eval against the one after SFT on the same held-out
    items (exact before and after, items gained and lost, the sign test's p); {} before a
    second eval exists."""
    files = RunFolder(run_dir).eval_files()
    if len(files) < 2:
        return {}
    first, last = (json.loads(files[s].read_text()) for s in (min(files), max(files)))
    return {str(d): {**c, "from_step": min(files), "to_step": max(files)}
            for d, c in changes_by_difficulty(first["items"], last["items"], matched_only=True).items()}


def eval_row(result: dict) -> dict:
    return {"kind": "eval", "step": result["step"], "stage": result.get("stage"),
            "metrics": eval_metrics(result["by_difficulty"])}


@contextlib.contextmanager
def timed(run_dir, task: str, **fields):
    """Append the step's wall time and machine to timings.jsonl when it ends, failed or not:
    the run's compute budget counts every try, and a run may move between machines."""
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        row = {"task": task, **fields, "seconds": round(time.perf_counter() - t0, 2), "ok": ok,
               "machine": machine_name()}
        if rank_and_world()[0] == 0:  # data parallel: one row per step, not one per rank
            append_line(RunFolder(run_dir).timings, json.dumps(row))


def append_line(path: Path, line: str) -> None:
    """Append one line; a last line torn by a crash mid-append is closed first, so the new
    row starts a line of its own instead of being glued onto the torn one and lost with it."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")


def read_timings(run_dir) -> list[dict]:
    """Every row of timings.jsonl; a torn line (a crash mid-append) is skipped with a warning
    that names the file and line, since the rows around it are intact."""
    path = RunFolder(run_dir).timings
    if not path.is_file():
        return []
    rows = []
    for n, x in enumerate(path.read_text().splitlines(), start=1):
        if not x.strip():
            continue
        try:
            row = json.loads(x)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            print(f"warning: {path}:{n} is not a JSON row (torn by a crash?); skipped", file=sys.stderr)
    return rows


# ---------------------------------------------------------------- data


def build_data(cfg: Config, run_dir) -> dict:
    """Train sets for every difficulty a run can reach, held-out eval sets, a manifest and a sample."""
    run = RunFolder(run_dir)
    out, manifest_path = run.data, run.manifest
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    env = env_of(cfg)
    manifest = {"env": env.name, "seed": cfg.data.seed, "eval_seed": data.EVAL_SEED, "train": {}, "eval": {}}
    sample = []
    for d in train_difficulties(cfg):
        recs = data.train_records(d, cfg.data.train_size, seed=cfg.data.seed, env=env)
        data.save_dataset(recs, run.dataset("train", d), env)
        manifest["train"][str(d)] = {"path": run.dataset("train", d).name, "n": len(recs)}
        sample += recs[:2]
    for d in cfg.eval.difficulties:
        recs = data.eval_records(d, cfg.data.eval_size, env=env)
        data.save_dataset(recs, run.dataset("eval", d), env)
        manifest["eval"][str(d)] = {"path": run.dataset("eval", d).name, "n": len(recs)}
    data.write_jsonl(sample, run.sample)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))  # last: marks the data complete
    return manifest


def load_split(run_dir, split: str, difficulty: int) -> list[dict]:
    return data.load_records(RunFolder(run_dir).dataset(split, difficulty))


# ---------------------------------------------------------------- the process-wide model cache


def engine_for_config(cfg: Config, model, tokenizer, progress: bool = True):
    """The rollout engine a config's `rollout` section names, around an already-loaded model."""
    from picorl.rollout import make_engine

    r = cfg.rollout
    options = dict(batch_size=r.batch_size, progress=progress, hf_cache=r.hf_cache, hf_compile=r.hf_compile,
                   graph_compile=r.graph_compile)
    if r.engine == "vllm":
        from picorl.models import resolve_model
        options.update(model_path=resolve_model(cfg.model.name), gpu_memory_utilization=r.gpu_memory_utilization,
                       max_model_len=r.max_model_len, lora_rank=cfg.model.lora.rank, dtype=cfg.model.dtype,
                       seed=cfg.run.seed)
    return make_engine(r.engine, model, tokenizer, **options)


class Session:
    """The loaded model, tokenizer, engine and trainer, shared by consecutive tasks.

    `loaded` names the checkpoint the in-memory weights equal; anything else (a failure
    mid-update, a different checkpoint) makes the next step reload from disk.
    """
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = self.tokenizer = self.engine = self.trainer = None
        self.loaded: str | None = None
        self.pristine = False  # base weights + a fresh adapter, untouched
        self._records: dict = {}

    def fresh(self) -> None:
        """Base weights and a new adapter (a retried SFT must not continue a half-trained one)."""
        if self.pristine:
            return
        from picorl.models import load_for_config

        self.model, self.tokenizer = load_for_config(self.cfg)
        self.engine = engine_for_config(self.cfg, self.model, self.tokenizer)
        self.trainer, self.loaded, self.pristine = None, None, True

    def records(self, run_dir, split, d):
        key = (str(run_dir), split, d)
        if key not in self._records:
            self._records[key] = load_split(run_dir, split, d)
        return self._records[key]

    def eval_engine(self, progress: bool = True):
        """The rollout engine when it is the graph engine (synced weights, captured graphs), else a new hf one."""
        from picorl.rollout.graph import GraphEngine
        if isinstance(self.engine, GraphEngine):
            return self.engine
        return eval_engine(self.cfg, self.model, self.tokenizer, progress)

    def get_trainer(self):
        from picorl.trainer import GRPOTrainer
        if self.trainer is None:
            self.trainer = GRPOTrainer(self.model, self.tokenizer, self.engine, self.cfg)
        return self.trainer

    def restore(self, ckpt: Path) -> tuple[dict, dict]:
        """Make memory equal checkpoint `ckpt` (every trained weight, optimizer, RNG)."""
        if self.model is None:
            self.fresh()
        state, info = checkpoint.load_checkpoint(ckpt, self.model)
        if "optimizer" in state:
            self.get_trainer().load_state_dict(state)
        self.engine.sync_weights(self.model)
        self.loaded, self.pristine = str(ckpt), False
        return state, info


_SESSIONS: dict[str, Session] = {}


def session_for(cfg: Config) -> Session:
    key = dump_yaml(cfg)  # one session per resolved config: the model, adapter and engine all follow from it
    if key not in _SESSIONS:
        _SESSIONS.clear()  # one model in memory at a time
        _SESSIONS[key] = Session(cfg)
    return _SESSIONS[key]


def clear_sessions() -> None:
    _SESSIONS.clear()


# ---------------------------------------------------------------- SFT


def _save(sess: Session, run_dir, step: int, info: dict, history: list[dict]) -> Path:
    """Checkpoint `step`; data parallel, rank 0 writes it (the ranks hold equal weights) and the others wait."""
    trainer = sess.get_trainer()
    root = RunFolder(run_dir).checkpoints
    path = checkpoint.step_path(root, step)
    if rank_and_world()[0] == 0:
        checkpoint.save_checkpoint(root, step, sess.model, trainer.state_dict(), info=info,
                                   keep_last=sess.cfg.run.keep_checkpoints, history=history)
    barrier()
    sess.loaded = str(path)
    return path


def run_sft(cfg: Config, run_dir, progress: bool = True) -> dict:
    """SFT warmup from the base model; writes checkpoint step_0 (also when SFT is off)."""
    latest = checkpoint.latest_checkpoint(RunFolder(run_dir).checkpoints)
    if latest is not None:
        return {"skipped": True, "checkpoint": str(latest)}
    with timed(run_dir, "sft"):
        return _sft(cfg, run_dir, progress)


def _sft(cfg: Config, run_dir, progress: bool) -> dict:
    sess = session_for(cfg)
    sess.fresh()
    sess.pristine = False  # training starts: a retry after a failure must reload
    history = []
    if cfg.sft.enabled and cfg.sft.steps > 0:
        records = [r for d in cfg.sft.difficulties for r in sess.records(run_dir, "train", d)]
        torch.manual_seed(cfg.run.seed)
        steps = train_sft(sess.model, sess.tokenizer, records, style=cfg.sft.style, steps=cfg.sft.steps, env=env_of(cfg),
                          batch_size=cfg.sft.batch_size, lr=cfg.sft.lr, lr_schedule=cfg.sft.lr_schedule,
                          warmup_steps=cfg.sft.warmup_steps, compile_forward=cfg.sft.compile, seed=cfg.run.seed,
                          group_by_length=cfg.sft.group_by_length, max_skips_in_a_row=MAX_SKIPS_IN_A_ROW,
                          progress=progress, on_step=lambda s, _: fault_point("sft", s))
        history = [{"kind": "sft", "step": i + 1, "stage": "sft", "metrics": m} for i, m in enumerate(steps)]
        sess.engine.sync_weights(sess.model)  # an engine with its own weights (vLLM) gets the SFT adapter
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    path = _save(sess, run_dir, 0, {"phase": "sft", "stage": -1, "curriculum": None}, history)
    return {"skipped": False, "checkpoint": str(path), "sft_steps": len(history),
            "loss_first": history[0]["metrics"]["sft/loss"] if history else None,
            "loss_last": history[-1]["metrics"]["sft/loss"] if history else None}


# ---------------------------------------------------------------- GRPO chunks


def run_chunk(cfg: Config, run_dir, chunk: Chunk, progress: bool = True) -> dict:
    """Run updates chunk.start..chunk.end from the latest checkpoint and write a checkpoint."""
    latest = checkpoint.latest_checkpoint(RunFolder(run_dir).checkpoints)
    if latest is None:
        raise RuntimeError(f"no checkpoint under {RunFolder(run_dir).checkpoints}: run the SFT step first")
    info = checkpoint.read_info(latest)
    if info["step"] >= chunk.end:
        return {"skipped": True, "step": info["step"], "checkpoint": str(latest)}
    if info["step"] < chunk.start:
        raise RuntimeError(f"chunk {chunk.start}-{chunk.end} needs checkpoint step_{chunk.start}, "
                           f"latest is step_{info['step']}")
    with timed(run_dir, "grpo", start=chunk.start, end=chunk.end):
        return _chunk(cfg, run_dir, chunk, latest, info, progress)


def _chunk(cfg: Config, run_dir, chunk: Chunk, latest: Path, info: dict, progress: bool) -> dict:
    sess = session_for(cfg)
    if sess.loaded != str(latest):
        sess.restore(latest)
    history = read_history(run_dir)
    trainer = sess.get_trainer()
    trainer.step = info["step"]
    stage = cfg.stages[chunk.stage]
    curriculum = Curriculum.for_stage(stage)
    if info.get("stage") == chunk.stage and info.get("curriculum"):
        curriculum.load_state_dict(info["curriculum"])
    sess.loaded = None  # memory diverges from the checkpoint from here on
    from tqdm.auto import tqdm
    for _ in tqdm(range(chunk.end - trainer.step), desc=f"grpo {chunk.start}->{chunk.end}", unit="update",
                  disable=not progress):
        d = curriculum.difficulty
        m = trainer.update(sess.records(run_dir, "train", d))
        row = {k: v for k, v in m.items() if isinstance(v, float) or isinstance(v, int)}
        row["difficulty"] = d
        history.append({"kind": "train", "step": trainer.step, "stage": chunk.stage,
                        "metrics": {f"train/{k}": float(v) for k, v in row.items()}})
        curriculum.observe(m["task_correct"])
        fault_point("update", trainer.step)
        if trainer.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
            _save(sess, run_dir, trainer.step, {"phase": "grpo", "stage": chunk.stage,
                                                "curriculum": curriculum.state_dict()}, history)
            raise NumericalError(f"{trainer.skipped_in_a_row} updates in a row had a non-finite loss or "
                                 f"gradient norm (last at update {trainer.step}); stopped with a checkpoint")
    path = _save(sess, run_dir, trainer.step, {"phase": "grpo", "stage": chunk.stage,
                                               "curriculum": curriculum.state_dict()}, history)
    return {"skipped": False, "step": trainer.step, "checkpoint": str(path), "difficulty": curriculum.difficulty}


# ---------------------------------------------------------------- evals


def eval_engine(cfg: Config, model, tokenizer, progress: bool = True):
    """The greedy engine of evals: the graph engine when the run trains with it (its greedy
    tokens equal transformers', tests/test_graph_engine.py), else transformers with the run's
    cache and compile switches (the reference measurement, whatever trains)."""
    if cfg.rollout.engine == "graph":
        from picorl.rollout.graph import GraphEngine
        return GraphEngine(model, tokenizer, batch_size=cfg.eval.batch_size, progress=progress)
    return HFEngine(model, tokenizer, batch_size=cfg.eval.batch_size, progress=progress,
                    cache=cfg.rollout.hf_cache, compile=cfg.rollout.hf_compile)


def run_eval(cfg: Config, run_dir, step: int, progress: bool = True) -> dict:
    """Greedy eval of checkpoint step_N on the held-out sets; writes evals/step_N.json."""
    out, ckpt = RunFolder(run_dir).eval_file(step), RunFolder(run_dir).checkpoint(step)
    if out.is_file():
        return json.loads(out.read_text())
    if not checkpoint.is_checkpoint(ckpt):
        raise FileNotFoundError(f"no checkpoint {ckpt} to evaluate (pruned? raise run.keep_checkpoints)")
    with timed(run_dir, "eval", step=step):
        return _eval(cfg, run_dir, step, ckpt, out, progress)


def _eval(cfg: Config, run_dir, step: int, ckpt: Path, out: Path, progress: bool) -> dict:
    fault_point("eval", step)
    sess = session_for(cfg)
    if sess.loaded != str(ckpt):
        sess.restore(ckpt)
    info = checkpoint.read_info(ckpt)
    sets = {d: sess.records(run_dir, "eval", d)[:cfg.eval.size] for d in cfg.eval.difficulties}
    by_d, items = evaluate_sets(sess.model, sess.tokenizer, sets, max_tokens=cfg.eval.max_tokens, env=env_of(cfg),
                                engine=sess.eval_engine(progress))
    result = {"step": step, "stage": info.get("stage"), "by_difficulty": {str(d): s for d, s in by_d.items()},
              "items": items}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result))
    return result
