"""The RolloutEngine interface.

An engine turns chat prompts into completions; the trainer never needs to know which
engine made them. `generate(prompts, n, sampling)` returns one list per prompt holding its
n completions, in order, so that `groups[i]` is prompt i's group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]            # generated tokens, up to and including the stop token
    prompt_ids: list[int]           # the tokenized prompt the completion continues
    logprobs: list[float] | None = None  # sampling log-probs per token, where the engine gives them
    finished: bool = True           # stopped at eos rather than at max_tokens
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[Completion]]:
        """n completions for each chat prompt (a list of {'role', 'content'} messages)."""

    def sync_weights(self, model) -> None:
        """Make the engine sample from the current policy (a no-op for an engine that shares the model)."""


def samples_and_greedy(engine: RolloutEngine, prompts: list[list[dict]], n: int,
                       sampling: Sampling) -> list[list[Completion]]:
    """Each prompt's n samples, then its greedy completion: groups of n + 1.

    An engine that can decode greedy rows among sampled ones (`generate_with_greedy`) does it
    in one pass; any other engine takes a second, greedy call after the samples.
    """
    if hasattr(engine, "generate_with_greedy"):
        return engine.generate_with_greedy(prompts, n, sampling)
    groups = engine.generate(prompts, n, sampling)
    greedy = engine.generate(prompts, 1, Sampling(temperature=0.0, max_tokens=sampling.max_tokens))
    return [group + one for group, one in zip(groups, greedy)]


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion: the tokenizer's eos and any the generation config adds."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)
