"""The pipeline's steps as plain functions over a run folder (picorl/run_folder.py); the
Prefect tasks call these, in the flow's order:

    build_data -> run_sft -> run_eval(0) -> [run_chunk -> (run_eval)]*

Every step is idempotent: it starts from the latest checkpoint and returns at once when
that checkpoint already covers it, so a retry or a resume continues where work stopped.
The history inside each checkpoint lists every metric row up to that checkpoint; the
tracking layer logs the rows it has not logged yet, so each step is logged exactly once.
The loaded model stays in memory between steps (picorl/session.py).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from picorl import checkpoint, data
from picorl.config import Config
from picorl.curriculum import Curriculum
from picorl.distributed import barrier, rank_and_world
from picorl.envs import env_of
from picorl.evaluate import evaluate_sets
from picorl.faults import fault_point
from picorl.files import atomic_write_text
from picorl.plan import Chunk, train_difficulties
from picorl.run_folder import RunFolder
from picorl.run_records import read_history, timed
from picorl.session import Session, session_for
from picorl.sft import train_sft

MAX_SKIPS_IN_A_ROW = 5


class NumericalError(RuntimeError):
    """Too many non-finite updates in a row; the run stopped at a checkpoint."""


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
    sess.saved(path)
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
    sess.training_started()
    history = []
    if cfg.sft.enabled and cfg.sft.steps > 0:
        records = [r for d in cfg.sft.difficulties for r in sess.records(run_dir, "train", d)]
        torch.manual_seed(cfg.run.seed)
        steps = train_sft(sess.model, sess.tokenizer, records, style=cfg.sft.style, steps=cfg.sft.steps, env=env_of(cfg),
                          batch_size=cfg.sft.batch_size, lr=cfg.sft.lr, lr_schedule=cfg.sft.lr_schedule,
                          warmup_steps=cfg.sft.warmup_steps, compile_forward=cfg.sft.compile, seed=cfg.run.seed,
                          group_by_length=cfg.sft.group_by_length, shared_prefix=cfg.sft.shared_prefix,
                          max_skips_in_a_row=MAX_SKIPS_IN_A_ROW,
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
    if not sess.holds(latest):
        sess.restore(latest)  # the trainer's step too
    history = read_history(run_dir)
    trainer = sess.get_trainer()
    trainer.reference_from(RunFolder(run_dir).checkpoint(0))  # the KL's reference: GRPO's start, also after a resume
    stage = cfg.stages[chunk.stage]
    curriculum = Curriculum.for_stage(stage)
    if info.get("stage") == chunk.stage and info.get("curriculum"):
        curriculum.load_state_dict(info["curriculum"])
    sess.diverged()
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


def run_eval(cfg: Config, run_dir, step: int, progress: bool = True) -> dict:
    """Greedy eval (and, with eval.samples, sampled) of checkpoint step_N on the held-out sets;
    writes evals/step_N.json."""
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
    if not sess.holds(ckpt):
        sess.restore(ckpt)
    info = checkpoint.read_info(ckpt)
    sets = {d: sess.records(run_dir, "eval", d)[:cfg.eval.size] for d in cfg.eval.difficulties}
    # Samples come from the rollout engine, at the temperature GRPO trains with, and from one
    # seed at every step, so the eval after SFT and the final one are drawn alike.
    by_d, items = evaluate_sets(sess.model, sess.tokenizer, sets, max_tokens=cfg.eval.max_tokens, env=env_of(cfg),
                                engine=sess.eval_engine(progress), samples=cfg.eval.samples,
                                sampling_engine=sess.engine, temperature=cfg.rollout.temperature, seed=cfg.run.seed)
    result = {"step": step, "stage": info.get("stage"), "by_difficulty": {str(d): s for d, s in by_d.items()},
              "items": items, **({"samples": cfg.eval.samples} if cfg.eval.samples else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result))
    return result
