"""The `picorl` command: gen, eval, train, export, config.

The entry point sits above everything else: `train` hands over to the Prefect flow in
flows/train.py (cli -> flows -> tasks -> tracking -> picorl); the other commands call the library,
which never imports prefect or mlflow.

Errors the user can fix (a bad value, a missing file) print one line naming it and exit 2;
nothing is half-written.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """An input problem the user can fix; printed as one line, exit status 2."""


def check_out(path: str, force: bool) -> None:
    """Refuse an --out that is not a new or replaceable regular file, before any work."""
    import os
    import stat

    p = Path(path)
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise UsageError(f"--out {path}: {e.strerror or e}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UsageError(f"--out {path} exists and is {kind}; write to a new file path")
    if mode is not None and not force:
        raise UsageError(f"--out {path} exists; pass --force to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"--out {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {path}: folder {parent} is not writable")


def env_from_args(args):
    """The environment of --env and its --env-option KEY=VALUE settings (values read as YAML)."""
    from picorl.config import ConfigError, parse_override
    from picorl.envs import load_env
    from picorl.envs.base import EnvError

    try:
        options = dict(parse_override(o) for o in args.env_option)
        return load_env(args.env, options)
    except (EnvError, ConfigError) as e:
        raise UsageError(f"--env {args.env}: {e}") from None


def add_env_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="letter_counting",
                   help="task environment: letter_counting, arithmetic, jsonl, or package.module:Class")
    p.add_argument("--env-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the environment, e.g. --env-option path=tasks.jsonl (repeatable)")


def cmd_gen(args) -> None:
    from picorl import data

    check_out(args.out, args.force)
    env = env_from_args(args)
    try:
        records = data.generate(args.split, args.difficulty, args.n, args.seed, env)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        data.write_jsonl(records, args.out)
    except OSError as e:
        raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
    print(json.dumps({"out": args.out, "n": len(records), "difficulty": args.difficulty,
                      "split": args.split, "seed": args.seed, "env": env.name}))


def cmd_eval(args) -> None:
    from picorl import data, evaluate, models

    check_out(args.out, args.force)
    for flag in ("max_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.samples < 0:
        raise UsageError(f"--samples must be >= 0, got {args.samples}")
    if args.samples and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a finite number > 0 to sample, got {args.temperature}")
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    env = env_from_args(args)
    try:
        records = data.read_jsonl(args.data, env)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    try:
        if args.adapter:
            models.check_adapter(args.adapter)  # before minutes of loading the base model
        models.pick_device(args.device)  # a missing CUDA device is named before anything loads
        if args.model.startswith("models:/"):
            model, tok = registered_model(args)
        else:
            model, tok = models.load_model(args.model, device=args.device, dtype=args.dtype)
        if args.adapter:
            model = models.load_adapter(model, args.adapter)
    except (models.ModelNotFoundError, models.BadModelError, models.NoDeviceError) as e:
        raise UsageError(str(e)) from None
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.max_tokens >= context:
        raise UsageError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens; it must be below {context}")
    summary, items = evaluate.evaluate_records(model, tok, records, max_tokens=args.max_tokens,
                                               batch_size=args.batch_size, env=env, samples=args.samples,
                                               temperature=args.temperature, seed=args.seed)
    try:
        data.write_jsonl(items, args.out)
    except OSError as e:
        raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
    print(json.dumps(summary))


def registered_model(args):
    """(model, tokenizer) of an MLflow registry URI `models:/<name>/<version>`."""
    import tempfile

    from picorl.serving import load_trained
    if args.adapter:
        raise UsageError("--adapter goes with a base model; a registered model carries its own weights")
    # The download (config, checkpoint and its optimizer state) is needed only until the
    # weights are in memory.
    with tempfile.TemporaryDirectory(prefix="picorl-registered-") as into:
        try:
            from tracking.registry import download_registered
            config, ckpt = download_registered(args.model, into)
        except Exception as e:  # no such model or version, MLflow unreachable, mlflow not installed
            raise UsageError(f"--model {args.model}: {str(e).splitlines()[0][:300]}") from None
        model, tok, _ = load_trained(config, ckpt, device=args.device)
    return model, tok


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config (defaults apply to keys it leaves out)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set grpo.lr=1e-5 (repeatable)")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="MLflow parent run id of a run to continue")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print the plan; load nothing")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="run GRPO chunks data parallel on N processes (GPUs) with torchrun; "
                        "the same as --set run.nproc_per_node=N")
    p.add_argument("--nnodes", type=int, default=None, metavar="N",
                   help="run GRPO chunks on N machines; the others run `picorl join` (--set run.nnodes=N)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="this machine as the others reach it, for --nnodes > 1 (--set run.rdzv_endpoint=...)")


def dry_run(cfg, model_problem: str | None) -> None:
    """Print the plan, and the model's problem on this machine as a warning."""
    from picorl.plan import describe_plan

    print(describe_plan(cfg))
    if model_problem:
        print(f"warning: {model_problem}")


# A fresh Prefect home migrates its database before the local API server answers: 20-60 s
# on 2 cores, past Prefect's own 20 s default. These apply only where the user set nothing.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's startup telemetry call
    "DO_NOT_TRACK": "1",  # the client's telemetry; both fail slowly with no network
}
STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def prefect_environment(environ=None) -> dict:
    """Set PREFECT_DEFAULTS where unset (before prefect is imported); returns what was set.

    A PREFECT_HOME whose parent folder is missing too is created: Prefect's server cannot open
    its database there, and reports only "unable to open database file", after its retries.
    """
    import os

    environ = os.environ if environ is None else environ
    applied = {k: v for k, v in PREFECT_DEFAULTS.items() if k not in environ}
    environ.update(applied)
    if environ.get("PREFECT_HOME"):
        Path(environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    return applied


def die_with_this_process() -> None:
    """A child's preexec_fn: Linux sends it SIGTERM when the process that started it dies, by
    SIGKILL too (the OOM killer's), so a crash leaves no server listening behind it."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@contextlib.contextmanager
def local_prefect_server():
    """Prefect's temporary API server for this command, started here, in the main thread, as a
    child tied to this process (`die_with_this_process`); Prefect would start the same server
    itself, as an ordinary child that a SIGKILL orphans. With PREFECT_API_URL set, or off
    Linux, Prefect is left to do as it does."""
    import subprocess

    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class TiedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            popen = subprocess.Popen  # Prefect's own command line, with the child tied to us
            subprocess.Popen = functools.partial(popen, preexec_fn=die_with_this_process)
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    server = TiedServer()
    try:
        server.start(timeout=int(float(os.environ[STARTUP_TIMEOUT])))
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        send_pending_prefect_records()
        server.stop()


def send_pending_prefect_records(timeout: float = 10.0) -> None:
    """Hand Prefect's batched logs and events to the server while it still listens: left to
    Prefect's exit hook they go out after the temporary server has stopped, and every
    finished run ends in "Error logging to API: All connection attempts failed"."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C is, so that the same clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def terminate_as_interrupt(signum, frame):
    """SIGTERM (a service manager) and SIGHUP (a closed terminal, a dropped ssh session) end a
    run as Ctrl-C does: the flow marks its MLflow run FAILED and Prefect stops its server."""
    raise Terminated(signum)


def cmd_train(args) -> None:
    import os

    from picorl.config import ConfigError, load_config, to_dict
    from picorl.preflight import check_config, model_problem

    for key in ("nproc_per_node", "nnodes", "rdzv_endpoint"):
        if getattr(args, key) is not None:
            args.set = [*args.set, f"run.{key}={getattr(args, key)}"]
    try:
        cfg = load_config(args.config, args.set)  # fail on a bad config before importing the orchestrator
        if args.dry_run:  # a model that is not on this machine is a warning here (the plan may be for another)
            dry_run(cfg, model_problem(cfg))
            return
        check_config(cfg, resume=args.resume is not None)  # the model's config and the output folder, once
    except ConfigError as e:
        raise UsageError(str(e)) from None
    prefect_environment()
    try:
        from flows.train import resumable_run, train
    except ImportError as e:
        raise UsageError(f"`picorl train` runs the Prefect flow and needs prefect and mlflow installed: {e}") from None
    if args.resume:
        try:  # MLflow alone knows the run: a bad --resume is refused before Prefect's server starts
            resumable_run(args.resume, args.set)
        except ConfigError as e:
            raise UsageError(str(e)) from None
    if not os.environ.get("PREFECT_API_URL"):
        print(f"starting Prefect's local API server (a first start can take a minute; "
              f"waiting up to {os.environ[STARTUP_TIMEOUT]} s)", file=sys.stderr, flush=True)
    try:
        with local_prefect_server():
            train(config=to_dict(cfg), overrides=args.set, resume=args.resume)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:
        if "ephemeral Prefect API server" not in str(e):
            raise
        raise UsageError(f"Prefect's local API server did not answer within {os.environ[STARTUP_TIMEOUT]} s; "
                         f"set {STARTUP_TIMEOUT} higher, or PREFECT_API_URL to a running server "
                         f"({str(e).splitlines()[0][:300]})") from None


def cmd_export(args) -> None:
    from picorl.export import export_run

    try:
        out = export_run(args.run_dir, args.out, step=args.step, fresh=args.fresh)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from None
    except OSError as e:  # e.g. a read-only destination: nothing was left behind (atomic folder)
        raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
    summary = {"out": str(out), **json.loads((out / "run.json").read_text())}
    if args.mlflow:
        summary["mlflow"] = export_mlflow_records(args.run_dir, out)
    print(json.dumps(summary))


def export_mlflow_records(run_dir, out) -> dict:
    """The run's MLflow records into out/mlruns; on failure none of them stay (the export does)."""
    import shutil

    from tracking import runs
    try:
        return runs.export_records(run_dir, out)
    except Exception as e:  # MLflow down, or no run for this folder: the rest of the export stands
        shutil.rmtree(out / runs.PORTABLE_STORE, ignore_errors=True)
        raise UsageError(f"exported {out}, but not its MLflow records: {str(e).splitlines()[0][:300]}") from None


def cmd_join(args) -> None:
    from picorl.parallel import join

    if not Path(args.output_dir).is_dir():
        raise UsageError(f"--output-dir {args.output_dir}: no such folder; it is the run.output_dir the "
                         "training machine writes to, shared with this one")
    join(args.output_dir, once=args.once, log=lambda line: print(f"picorl join: {line}", flush=True))


def config_table() -> str:
    """Every config knob as a markdown table (docs/config.md's reference)."""
    from picorl.config import describe

    rows = ["| key | default | what it does |", "|---|---|---|"]
    rows += [f"| `{k}` | `{v}` | {h} |" for k, v, h in describe()]
    return "\n".join(rows)


def cmd_config(args) -> None:
    print(config_table())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="picorl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gen", help="write an environment's tasks as JSONL (letter counting by default)")
    g.add_argument("--difficulty", type=int, required=True, help="tier of the environment (letter_counting: 1-10)")
    g.add_argument("--n", type=int, required=True, help="number of tasks (>= 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split", choices=["train", "eval", "fresh"], default="train",
                   help="train: never repeats a held-out string; eval: the fixed held-out set (seed 1234); "
                        "fresh: items the pipeline never generates (letter_counting: asked letters drawn uniformly)")
    add_env_args(g)
    g.add_argument("--out", required=True, help="output .jsonl path (a new file; see --force)")
    g.add_argument("--force", action="store_true", help="replace --out if it is an existing file")
    g.set_defaults(func=cmd_gen)

    e = sub.add_parser("eval", help="greedy evaluation of a model (+ adapter) on a JSONL set")
    e.add_argument("--model", default="smollm2-135m-instruct",
                   help="model name or folder, or a registered model models:/<name>/<version>")
    e.add_argument("--adapter", default=None, help="LoRA adapter folder (adapter_config.json + safetensors)")
    e.add_argument("--data", required=True, help="JSONL of the environment's records (letter_counting: string, "
                                                 "letters, answer per line)")
    add_env_args(e)
    e.add_argument("--out", required=True, help="JSONL of the input records with completion and prediction")
    e.add_argument("--force", action="store_true", help="replace --out if it is an existing file")
    e.add_argument("--max-tokens", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--samples", type=int, default=0, help="also sample each record this many times: sampled "
                   "accuracy and pass@k in the summary, each item's fraction of right samples as `sampled`")
    e.add_argument("--temperature", type=float, default=1.0, help="the samples' temperature (training's default)")
    e.add_argument("--seed", type=int, default=0, help="the samples' seed")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="run the training pipeline (Prefect flow, MLflow tracking)")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    x = sub.add_parser("export", help="copy a finished run's report, final eval, adapter and timings to a results folder")
    x.add_argument("--run-dir", required=True, help="the run folder (where `picorl train` wrote report.md)")
    x.add_argument("--out", required=True, help="a new folder, e.g. results/2026-11-25-smollm2-curriculum")
    x.add_argument("--step", type=int, default=None, help="the evaluated step to export (default: the last)")
    x.add_argument("--fresh", type=int, default=0, metavar="N",
                   help="also evaluate the adapter, and the after-SFT one, on N fresh items per eval difficulty "
                        "(fresh_eval.jsonl, sft_fresh_eval.jsonl)")
    x.add_argument("--mlflow", action="store_true",
                   help="bring the run's MLflow records along (OUT/mlruns), so `mlflow ui` opens it anywhere")
    x.set_defaults(func=cmd_export)

    j = sub.add_parser("join", help="lend this machine's GPUs to data-parallel runs (run.nnodes > 1) "
                                    "writing to a shared output folder")
    j.add_argument("--output-dir", required=True, help="the runs' run.output_dir, shared with the training machine")
    j.add_argument("--once", action="store_true", help="leave when a run this machine joined is over")
    j.set_defaults(func=cmd_join)

    c = sub.add_parser("config", help="print every config key with its default and help, as markdown")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    # Every command ends on SIGTERM or SIGHUP as on Ctrl-C: what it was writing is removed
    # (an export's temporary folder), a run is marked, and the exit status says which signal.
    # The caller's handlers come back afterwards (main may run inside another program); only
    # the main thread may set them.
    before = ({s: signal.signal(s, terminate_as_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
              if threading.current_thread() is threading.main_thread() else {})
    try:
        args.func(args)
    except UsageError as e:
        print(f"picorl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the run folder and MLflow run are marked; no traceback
        terminated = isinstance(e, Terminated)
        print(f"picorl {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (e.signum if terminated else 2)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
