"""The graph engine's CUDA path: captured graphs replay the eager step exactly. Skipped without CUDA."""
import pytest
import torch

from picorl import data, models
from picorl.rollout import Sampling
from picorl.rollout.graph import GraphEngine

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def prompts(n, difficulty=6):
    return [r["messages"] for r in data.eval_records(difficulty, n)]


@pytest.fixture
def model_and_tok(tokenizer):
    model = models.tiny_llama(len(tokenizer)).to("cuda", torch.bfloat16).eval()
    return models.add_lora(model, rank=4, alpha=8), tokenizer


def test_graph_replays_equal_the_eager_step(model_and_tok):
    model, tok = model_and_tok
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    greedy = Sampling(temperature=0.0, max_tokens=24)
    eager = GraphEngine(model, tok, batch_size=16, progress=False, use_graphs=False)
    graphs = GraphEngine(model, tok, batch_size=16, progress=False)
    assert graphs.use_graphs
    # Same kernels in the same order: a replay computes bit for bit what the eager step does.
    assert [g[0].token_ids for g in eager.generate(prompts(11), 1, greedy)] == \
           [g[0].token_ids for g in graphs.generate(prompts(11), 1, greedy)]
    s = Sampling(temperature=1.0, top_p=0.9, max_tokens=24, seed=5)
    a = [c.token_ids for g in graphs.generate(prompts(3), 4, s) for c in g]
    assert a == [c.token_ids for g in graphs.generate(prompts(3), 4, s) for c in g]  # seeds reproduce
    assert graphs.warmup_s > 0 and any(st.graphs for st in graphs.states.values())


def test_a_sync_reaches_captured_graphs(model_and_tok):
    model, tok = model_and_tok
    engine = GraphEngine(model, tok, batch_size=8, progress=False)
    greedy = Sampling(temperature=0.0, max_tokens=16)
    before = [g[0].token_ids for g in engine.generate(prompts(8), 1, greedy)]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    engine.sync_weights(model)
    after = [g[0].token_ids for g in engine.generate(prompts(8), 1, greedy)]
    fresh = GraphEngine(model, tok, batch_size=8, progress=False)
    assert after == [g[0].token_ids for g in fresh.generate(prompts(8), 1, greedy)]
    assert after != before
