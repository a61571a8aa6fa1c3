"""The run config: one dataclass tree, every knob with a type, a default and a help string.

Load order: dataclass defaults <- YAML file <- dotted `--set key=value` overrides.
`validate()` runs before any work so that a typo costs a second, not a GPU hour.

    cfg = load_config("configs/default.yaml", ["grpo.lr=1e-5", "rollout.engine=hf"])
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: six nested `*a` references expand a 456-byte file into millions of
    list items (43 s and 249 MB to validate), and no config needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML alias *{event.anchor} (line {event.start_mark.line + 1}): "
                              "aliases are not accepted in configs; write the value out")
        return super().compose_node(parent, index)


def read_yaml(text: str, where: str):
    """Parse one YAML document without aliases; errors name `where`."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None


def knob(default, help: str, **kw):
    """A config field with its one-line help string (listed by `picorl config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    enabled: bool = knob(True, "Train a LoRA adapter; false trains every weight (full fine-tuning).")
    rank: int = knob(32, "LoRA rank r.")
    alpha: int = knob(64, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = knob(0.0, "Dropout on the LoRA input; 0 keeps rollouts and training identical.")
    target_modules: list = knob(DEFAULT_LORA_TARGETS, "Module names that get an adapter (all attention and MLP projections by default).")
    base_dtype: str = knob("model", "The frozen base weights' matmuls while the adapter trains: bfloat16 runs them on bf16 copies (adapter, norms, attention and loss stay in the model's dtype; evals decode in it); auto picks bfloat16 for a float32 model on a CPU with bf16 matrix instructions (AMX or AVX512-BF16); model keeps the model's dtype.")
    top_layers: int = knob(0, "Adapters on the last N decoder layers only, so the backward stops at the lowest one (faster steps); 0 puts them on every layer.")


@dataclass
class ModelConfig:
    name: str = knob("smollm2-135m-instruct", "Embedded model name, a local HF directory, or a hub id already in the local HF cache.")
    dtype: str = knob("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.")
    device: str = knob("auto", "auto (cuda when available), cpu or cuda.")
    attention: str = knob("grouped_sdpa", "grouped_sdpa (SDPA that shares key/value heads without copying them), sdpa or eager.")
    trust_remote_code: bool = knob(False, "Run code shipped with the model. Off unless you trust the model's source.")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter settings."})


@dataclass
class EnvConfig:
    name: str = knob("letter_counting", "The task: a built-in environment (letter_counting, arithmetic, jsonl) or package.module:Class for your own (picorl/envs/base.py).")
    options: dict = knob({}, "Settings the environment takes (jsonl: path, match, ...; letter_counting: train_letters); checked when it loads.")


@dataclass
class RewardConfig:
    kind: str = knob("binary", "binary: 1 when the answer is exactly right, else 0. partial: 0 unformatted, else 0.1 + 0.9 x the environment's fraction right (the reference system's).")
    format_bonus: float = knob(0.0, "Added to the reward of every well-formatted answer: a formatted wrong answer then beats an unformatted one.")
    overlong_buffer: int = knob(0, "DAPO's soft overlong penalty: the reward falls linearly to -1 over the last N tokens before rollout.max_tokens; 0 turns it off.")


@dataclass
class DataConfig:
    train_size: int = knob(2000, "Training tasks generated per difficulty used by SFT or a curriculum stage.")
    seed: int = knob(0, "Seed of the training sets; eval sets use fixed seeds of their own.")
    eval_size: int = knob(128, "Held-out eval tasks per difficulty.")


@dataclass
class SFTConfig:
    enabled: bool = knob(True, "Run the SFT warmup before RL.")
    style: str = knob("cot", "Demonstration style, one the environment offers. letter_counting: cot (spell the string "
                          "out with a running tally, then answer), cot_tokens (the same, one line per token of the "
                          "string), direct (the answer tag only); arithmetic: cot (digit by digit), direct; jsonl: given.")
    steps: int = knob(50, "Optimizer steps of SFT.")
    batch_size: int = knob(8, "Demonstrations per SFT step.")
    lr: float = knob(5e-4, "SFT learning rate (LoRA): the peak, when a schedule warms up or decays it.")
    lr_schedule: str = knob("constant", "constant, or decaying to 0 by the last step: cosine or linear.")
    warmup_steps: int = knob(0, "Steps of linear learning-rate warmup before the schedule.")
    difficulties: list = knob([1, 2, 3, 4, 5, 6], "Difficulties the demonstrations are drawn from, uniformly.")
    compile: bool = knob(False, "torch.compile (Inductor) the forward for SFT: fewer, fused kernels for a GPU to launch, paid for "
                         "by a compile at the first step. Not for a CPU: on 2 cores the 135M model's took 6.8 min and saved 2% a step.")
    group_by_length: bool = knob(True, "Batch demonstrations of like length (an epoch at a time), so a batch is "
                                 "little padding; false draws each batch at random.")
    shared_prefix: bool = knob(True, "Run a batch's common opening (the system prompt) once, every row attending to its "
                               "keys/values: the same loss and gradients with fewer tokens (1.32x the steps/s for "
                               "letter counting's cot, batch 8, on 2 CPU cores: bench.sft_speed). Not with compile.")


@dataclass
class RolloutConfig:
    engine: str = knob("hf", "hf (transformers generate), graph (our own decode step over a static KV cache, CUDA graphs on a GPU; the fast one there) or vllm.")
    temperature: float = knob(1.0, "Sampling temperature for training rollouts; evals are greedy (0).")
    top_p: float = knob(1.0, "Nucleus sampling threshold in (0, 1].")
    max_tokens: int = knob(512, "Most new tokens per completion.")
    batch_size: int = knob(64, "Sequences generated per call to the engine (all tasks x k when it fits).")
    hf_cache: str = knob("dynamic", "hf: KV cache, dynamic (grows per step) or static (preallocated; fixed shapes for compile).")
    hf_compile: bool = knob(False, "hf: torch.compile the decode step (needs hf_cache static); pays a compile on the first call.")
    graph_compile: bool = knob(False, "graph: torch.compile (Inductor) the decode step before it is captured, fusing its small kernels; pays a compile at the first call.")
    dtype: str = knob("model", "graph: the dtype of the engine's weight copy and KV cache. model: the training model's; "
                      "bfloat16: bf16 copies of float32 weights (rollouts sample the policy rounded to bf16, as vLLM "
                      "serves a float32-trained one; the loss still scores them in float32), 1.95x the tokens/s on a "
                      "2-core CPU with AMX tiles (bench.rollout); auto: bfloat16 on a CPU with bf16 matrix instructions (AMX or AVX512-BF16), the model's elsewhere. "
                      "Evals decode in the model's dtype.")
    gpu_memory_utilization: float = knob(0.3, "vLLM: fraction of GPU memory (of RAM on CPU) it may take, in (0, 1].")
    max_model_len: int = knob(2048, "vLLM: longest prompt + completion in tokens.")


@dataclass
class GRPOConfig:
    algorithm: str = knob("grpo", "grpo, dr_grpo, dapo, reinforce or ppo.")
    tasks_per_update: int = knob(8, "Distinct tasks (groups) per update.")
    group_size: int = knob(8, "Completions sampled per task: the k of a group.")
    lr: float = knob(1e-5, "Learning rate of the policy update.")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    warmup_updates: int = knob(0, "Updates of linear learning-rate warmup; then as grpo.lr_schedule says.")
    lr_schedule: str = knob("constant", "constant, or decaying to 0 by the last update of all stages: cosine or "
                            "linear (the last updates then take small steps).")
    eps_low: float = knob(0.2, "Lower clip range of the ratio (1 - eps_low).")
    eps_high: float | None = knob(None, "Upper clip range of the ratio (1 + eps_high); null: 0.28 for dapo (clip-higher), else 0.2.")
    kl_coef: float = knob(0.0, "Weight of the KL penalty to the reference policy (grpo.kl_reference); 0 skips it.")
    kl_reference: str = knob("start", "The KL term's reference policy: start, the weights GRPO started from (the SFT policy, "
                                      "checkpoint step_0); base, the model with the LoRA adapter off (before SFT).")
    epochs: int = knob(1, "Passes over one batch of rollouts; ppo needs >= 2, the others usually 1.")
    shared_prefix: bool = knob(True, "Run each prompt once per micro-batch and its completions on its cached keys/values (same loss and gradients, fewer tokens); false runs every full sequence.")
    micro_batch_size: int = knob(16, "Sequences per forward/backward; gradients accumulate over the batch.")
    logprob_chunk: int = knob(0, "Completion positions per pass through the output head for the loss's log-probs; no (positions x vocab) logits are held, same values and gradients. 0: the whole logits at once.")
    max_grad_norm: float = knob(1.0, "Gradient norm clip.")
    max_resample_rounds: int = knob(4, "dapo: extra rollout rounds to refill groups dropped for zero variance.")
    overlong_filter: bool = knob(False, "DAPO's overlong filter: completions cut off by rollout.max_tokens carry no loss (they still count in their group's advantages).")
    greedy_member: bool = knob(False, "Add each task's greedy completion to its group (k + 1 members; the graph engine "
                                      "decodes it among the samples, other engines in a second pass): "
                                      "the greedy answer then takes its place in the advantages, pushed down where a sample beats it "
                                      "and up where it beats the samples. Metrics other than train/greedy_correct stay over the k samples.")


@dataclass
class StageConfig:
    difficulty: int = knob(1, "Difficulty (tier of the environment) the stage starts at.")
    updates: int = knob(20, "Update budget of the stage.")
    promote_at: float | None = knob(None, "Move up a difficulty when the rolling fraction correct reaches this; null keeps it fixed.")
    demote_below: float | None = knob(None, "Move down a difficulty when the rolling fraction correct falls below this.")
    window: int = knob(32, "Tasks in the rolling window of the promotion rule.")
    max_difficulty: int = knob(10, "Promotion never goes above this difficulty (nor the environment's top tier).")


@dataclass
class EvalConfig:
    every: int = knob(10, "Greedy eval every N updates (and after SFT and at the end).")
    difficulties: list = knob([3, 5, 6], "Difficulties of the held-out eval sets.")
    size: int = knob(32, "Items of each held-out set used per eval (at most data.eval_size).")
    max_tokens: int = knob(512, "Most new tokens per eval completion.")
    batch_size: int = knob(32, "Sequences per greedy generate call.")
    samples: int = knob(0, "Samples per item at rollout.temperature beside the greedy answer, for sampled accuracy "
                           "(eval/sampled_d3) and pass@k (eval/pass_d3); 0 evaluates greedily only.")


@dataclass
class RunConfig:
    name: str = knob("picorl", "Run name, used for the output folder and the MLflow run.")
    seed: int = knob(0, "Seed of torch, sampling and task order.")
    output_dir: str = knob("outputs", "Where run folders (checkpoints, report) are written.")
    experiment: str = knob("picorl", "MLflow experiment name.")
    chunk_updates: int = knob(10, "Updates per GRPO chunk (one Prefect task, retried whole); each chunk ends with a checkpoint.")
    keep_checkpoints: int = knob(2, "Checkpoints kept per run besides step_0 (after SFT, the baseline); older ones are pruned after a new one is complete.")
    retries: int = knob(2, "Prefect retries per task.")
    retry_delay_s: float = knob(5.0, "Seconds between retries.")
    tracking_outage_s: float = knob(600.0, "How long training goes on while MLflow is unreachable before a task fails (its retry resumes).")
    nproc_per_node: int = knob(1, "Processes (one per GPU) that run each GRPO chunk data parallel under torchrun; 1 runs it in the flow's process.")
    nnodes: int = knob(1, "Machines that run each GRPO chunk together; the others run `picorl join` on a run.output_dir they share with this one.")
    rdzv_endpoint: str | None = knob(None, "host:port of this machine, reachable from the others (torchrun's c10d rendezvous); needed when run.nnodes > 1.")
    registered_model: str | None = knob(None, "When set, the final weights are logged as an MLflow model and registered under this name.")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run identity and orchestration."})
    env: EnvConfig = field(default_factory=EnvConfig, metadata={"help": "The task environment."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model and adapter."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Generated data sets."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Reward function."})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "SFT warmup."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "Rollout engine and sampling."})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"help": "Policy optimisation."})
    stages: list = field(default_factory=lambda: [StageConfig(difficulty=6, updates=200)],
                         metadata={"help": "Curriculum stages, run in order."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Periodic greedy evaluation."})


# Value rules: key -> (predicate, what it must be). Checked after every load.
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.device": ("auto", "cpu", "cuda"),
    "model.attention": ("grouped_sdpa", "sdpa", "eager"),
    "reward.kind": ("binary", "partial"),
    "sft.lr_schedule": ("constant", "cosine", "linear"),
    "grpo.lr_schedule": ("constant", "cosine", "linear"),
    "rollout.engine": ("hf", "graph", "vllm"),
    "rollout.hf_cache": ("dynamic", "static"),
    "rollout.dtype": ("model", "bfloat16", "auto"),
    "model.lora.base_dtype": ("model", "bfloat16", "auto"),
    "grpo.algorithm": ("grpo", "dr_grpo", "dapo", "reinforce", "ppo"),
    "grpo.kl_reference": ("start", "base"),
}
_pos = (lambda v: v > 0, "> 0")
_nonneg = (lambda v: v >= 0, ">= 0")
_frac = (lambda v: 0 < v <= 1, "in (0, 1]")
_diff = (lambda v: v >= 1, ">= 1 (tiers are numbered from 1)")
RULES = {
    "model.lora.rank": _pos, "model.lora.alpha": _pos, "model.lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.lora.top_layers": (lambda v: v >= 0, ">= 0 (0 puts adapters on every layer)"),
    "reward.format_bonus": _nonneg, "reward.overlong_buffer": _nonneg,
    "data.train_size": _pos, "data.eval_size": _pos,
    "sft.steps": _nonneg, "sft.batch_size": _pos, "sft.lr": _pos, "sft.warmup_steps": _nonneg,
    "rollout.temperature": _nonneg, "rollout.top_p": _frac, "rollout.max_tokens": _pos,
    "rollout.batch_size": _pos, "rollout.gpu_memory_utilization": _frac, "rollout.max_model_len": _pos,
    "grpo.tasks_per_update": _pos, "grpo.group_size": (lambda v: v >= 2, ">= 2"), "grpo.lr": _pos,
    "grpo.weight_decay": _nonneg, "grpo.warmup_updates": _nonneg, "grpo.eps_low": (lambda v: 0 < v < 1, "in (0, 1)"), "grpo.eps_high": _pos,
    "grpo.kl_coef": _nonneg, "grpo.epochs": _pos, "grpo.micro_batch_size": _pos, "grpo.logprob_chunk": _nonneg, "grpo.max_grad_norm": _pos,
    "grpo.max_resample_rounds": _nonneg,
    "eval.every": _pos, "eval.size": _pos, "eval.max_tokens": _pos, "eval.batch_size": _pos, "eval.samples": _nonneg,
    "run.seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32): torch's and the samplers' seeds are derived from it"),
    "run.chunk_updates": _pos, "run.nproc_per_node": _pos, "run.nnodes": _pos, "run.keep_checkpoints": _pos, "run.retries": _nonneg, "run.retry_delay_s": _nonneg, "run.tracking_outage_s": _nonneg,
    "stage.difficulty": _diff, "stage.updates": _pos, "stage.window": _pos, "stage.max_difficulty": _diff,
}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# The item type of every list knob (each must also be non-empty).
LIST_ITEMS = {"model.lora.target_modules": str, "sft.difficulties": int, "eval.difficulties": int}
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RDZV_ENDPOINT = re.compile(r"[A-Za-z0-9._-]+:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5}")


def yaml_float(value):
    """YAML 1.1 reads `1e-5` (no dot) as a string; a float is what anyone means. The one rule
    for both a config file's values and --set's."""
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float:
        value = yaml_float(value)
    if tp is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if tp is list:
        kind = LIST_ITEMS.get(key)
        bad = [v for v in value if kind and (not isinstance(v, kind) or isinstance(v, bool))]
        if bad:
            raise ConfigError(f"{key}: every item must be {kind.__name__}, got {bad[0]!r}")
        if not value:
            raise ConfigError(f"{key}: expected a non-empty list, got []")
    return value


def _build(cls, raw, prefix: str = ""):
    """Build dataclass `cls` from a dict, naming unknown keys with their closest valid key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        if cls is Config and key == "stages":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"stages: expected a non-empty list of stages, got {value!r}")
            kwargs[key] = [_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, types_[key], full)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists of mappings become 'stages.0.difficulty'."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def _set_dotted(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': no item {part} in '{'.'.join(parts[:i])}'")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:i])}' is a value, not a section")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:-1])}' is a value, not a section")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{dotted}': no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'grpo.lr=1e-5' -> ('grpo.lr', 1e-05). Values are read as YAML, so 'null', '[3, 5]' and 'true' work."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.load(value, Loader=_NoAliasLoader) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), yaml_float(parsed)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply dotted overrides, validate, and return the Config."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text file (not UTF-8)") from None
        raw = read_yaml(text, str(p))
        if raw is None:
            raise ConfigError(f"{p} is empty: a config file must set something (run every default "
                              "by leaving --config out)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for text in overrides or []:
        key, value = parse_override(text)
        if key.split(".")[0] == "stages" and "stages" not in raw:
            raw["stages"] = to_dict(Config())["stages"]
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    """The validated Config of a nested dict (a YAML mapping, or `to_dict` of a config: what
    `picorl train` hands the flow, and the flow its tasks, so that nothing reads the YAML twice)."""
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first key whose value is out of range."""
    flat = flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not one of {', '.join(allowed)}")
    for key, value in flat.items():
        rule_key = "stage." + key.split(".", 2)[2] if key.startswith("stages.") else key
        rule = RULES.get(rule_key)
        if rule and value is not None and not rule[0](value):
            raise ConfigError(f"{key}={value!r} must be {rule[1]}")
    for name in ("sft.difficulties", "eval.difficulties"):
        for d in flat[name]:
            if not isinstance(d, int) or isinstance(d, bool) or d < 1:
                raise ConfigError(f"{name} holds {d!r}; difficulties must be integers >= 1")
    validate_env(cfg)  # difficulties against the environment's tiers, before the rules between them
    for i, s in enumerate(cfg.stages):
        for k in ("promote_at", "demote_below"):
            v = getattr(s, k)
            if v is not None and not 0 <= v <= 1:
                raise ConfigError(f"stages.{i}.{k}={v!r} must be in [0, 1]")
        if s.promote_at is not None and s.demote_below is not None and s.demote_below >= s.promote_at:
            raise ConfigError(f"stages.{i}.demote_below={s.demote_below!r} must be below promote_at={s.promote_at!r}")
        if s.difficulty > s.max_difficulty:
            raise ConfigError(f"stages.{i}.difficulty={s.difficulty!r} is above its max_difficulty={s.max_difficulty!r}")
    if not RUN_NAME.fullmatch(cfg.run.name):
        raise ConfigError(f"run.name={cfg.run.name!r} must be a plain name (letters, digits, '.', '_', '-', "
                          "starting with a letter or digit): it names a folder inside run.output_dir")
    if cfg.grpo.algorithm == "ppo" and cfg.grpo.epochs < 2:
        raise ConfigError(f"grpo.algorithm=ppo needs grpo.epochs >= 2 (several passes over one batch), got {cfg.grpo.epochs}")
    if cfg.grpo.kl_reference == "base" and not cfg.model.lora.enabled:
        raise ConfigError("grpo.kl_reference=base is the model with its LoRA adapter off; with model.lora.enabled=false "
                          "there is no adapter to turn off (use grpo.kl_reference=start)")
    if cfg.sft.enabled and cfg.sft.warmup_steps >= cfg.sft.steps > 0:
        raise ConfigError(f"sft.warmup_steps={cfg.sft.warmup_steps} must be below sft.steps={cfg.sft.steps}: "
                          "SFT would end before its learning rate reached sft.lr")
    if cfg.rollout.hf_compile and cfg.rollout.hf_cache != "static":
        raise ConfigError(f"rollout.hf_compile=true needs rollout.hf_cache=static, got {cfg.rollout.hf_cache!r}")
    if cfg.model.lora.base_dtype != "model" and not cfg.model.lora.enabled:
        raise ConfigError(f"model.lora.base_dtype={cfg.model.lora.base_dtype} keeps bf16 copies of the frozen base "
                          "weights; with model.lora.enabled=false every weight trains and a copy would go stale "
                          "(set model.lora.base_dtype=model)")
    if cfg.rollout.dtype != "model" and cfg.rollout.engine != "graph":
        raise ConfigError(f"rollout.dtype={cfg.rollout.dtype} is the graph engine's; rollout.engine={cfg.rollout.engine} "
                          "decodes in the model's dtype (set rollout.dtype=model, or rollout.engine=graph)")
    cores = os.cpu_count() or 1
    if cfg.run.nproc_per_node > cores:
        raise ConfigError(f"run.nproc_per_node={cfg.run.nproc_per_node} is more processes than this machine's "
                          f"{cores} cores (one process per GPU, or per core on a CPU)")
    if cfg.run.nnodes > 1 and not RDZV_ENDPOINT.fullmatch(cfg.run.rdzv_endpoint or ""):
        raise ConfigError(f"run.nnodes={cfg.run.nnodes} needs run.rdzv_endpoint=host:port (this machine, reachable "
                          f"from the others), got {cfg.run.rdzv_endpoint!r}")
    if cfg.rollout.temperature == 0:
        raise ConfigError("rollout.temperature=0 samples one greedy completion k times: every group has one reward, "
                          "no advantage and no update; sample at a temperature > 0 (evals are greedy anyway)")
    if cfg.reward.overlong_buffer > cfg.rollout.max_tokens:
        raise ConfigError(f"reward.overlong_buffer={cfg.reward.overlong_buffer} must be <= rollout.max_tokens="
                          f"{cfg.rollout.max_tokens}: the penalty's ramp ends at max_tokens")
    if cfg.eval.size > cfg.data.eval_size:
        raise ConfigError(f"eval.size={cfg.eval.size!r} must be <= data.eval_size={cfg.data.eval_size!r}")


def validate_env(cfg: Config) -> None:
    """Load the environment (its import and options checked) and hold every difficulty, the SFT
    style and the eval size against what it has."""
    from picorl.envs import load_env
    from picorl.envs.base import EnvError, tier_range

    if not isinstance(cfg.env.name, str) or not cfg.env.name:
        raise ConfigError(f"env.name={cfg.env.name!r} must name an environment")
    try:
        env = load_env(cfg.env.name, cfg.env.options)
    except EnvError as e:
        raise ConfigError(str(e)) from None
    tiers = f"in {tier_range(env)} (the tiers of {env.name})"
    sft_on = cfg.sft.enabled and cfg.sft.steps > 0
    for name in (["sft.difficulties"] if cfg.sft.enabled else []) + ["eval.difficulties"]:
        for d in getattr(cfg, name.split(".")[0]).difficulties:
            if d not in env.tiers:
                raise ConfigError(f"{name} holds {d!r}; difficulties must be {tiers}")
    for i, s in enumerate(cfg.stages):
        if s.difficulty not in env.tiers:
            raise ConfigError(f"stages.{i}.difficulty={s.difficulty!r} must be {tiers}")
        if s.promote_at is not None and s.max_difficulty > env.top_tier:
            raise ConfigError(f"stages.{i}.max_difficulty={s.max_difficulty!r} must be {tiers}: promotion "
                              "climbs to it")
    if sft_on:
        if not env.demo_styles:
            raise ConfigError(f"env {env.name} offers no SFT demonstrations: set sft.enabled=false")
        if cfg.sft.style not in env.demo_styles:
            raise ConfigError(f"sft.style={cfg.sft.style!r} is not one of {', '.join(env.demo_styles)} "
                              f"(the styles env {env.name} offers)")
    for d in cfg.eval.difficulties:
        cap = env.capacity(d, "eval")
        if cap is not None and cfg.data.eval_size > cap:
            raise ConfigError(f"data.eval_size={cfg.data.eval_size} is more than the {cap} distinct eval items "
                              f"env {env.name} has at d{d}")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls=Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, help) for every knob, for `picorl config` and docs/config.md."""
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), key + ".")
        elif f.name == "stages":
            rows += describe(StageConfig, "stages[i].")
        else:
            rows.append((key, value, f.metadata.get("help", "")))
    return rows
