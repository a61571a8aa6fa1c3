"""Rollout engines behind one interface: chat prompts in, n sampled completions each out.
picorl/session.py builds them (`build_engine`, `engine_for_config`, `eval_engine`)."""
from picorl.rollout.base import Completion, RolloutEngine, Sampling, samples_and_greedy

__all__ = ["Completion", "RolloutEngine", "Sampling", "samples_and_greedy"]
