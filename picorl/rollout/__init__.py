"""Rollout engines behind one interface: chat prompts in, n sampled completions each out."""
from picorl.rollout.base import Completion, RolloutEngine, Sampling

__all__ = ["Completion", "RolloutEngine", "Sampling", "make_engine"]


def make_engine(kind: str, model, tokenizer, **options) -> RolloutEngine:
    """The engine named by `rollout.engine`."""
    if kind == "hf":
        from picorl.rollout.hf import HFEngine
        return HFEngine(model, tokenizer, batch_size=options.get("batch_size", 64),
                        progress=options.get("progress", True), cache=options.get("hf_cache", "dynamic"),
                        compile=options.get("hf_compile", False))
    if kind == "graph":
        from picorl.rollout.graph import GraphEngine
        return GraphEngine(model, tokenizer, batch_size=options.get("batch_size", 64),
                           progress=options.get("progress", True), compile_step=options.get("graph_compile", False))
    if kind == "vllm":
        try:
            from picorl.rollout.vllm import VLLMEngine
        except ImportError as e:
            raise RuntimeError(f"rollout.engine=vllm is not available here: {e}") from None
        return VLLMEngine(model, tokenizer, **options)
    raise ValueError(f"rollout.engine must be 'hf', 'graph' or 'vllm', got {kind!r}")
