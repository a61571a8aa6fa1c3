import pytest
import torch

from picorl import data
from picorl.rollout import Sampling
from picorl.session import build_engine
from picorl.rollout.graph import GraphEngine
from picorl.rollout.hf import HFEngine


def prompts(n):
    return [r["messages"] for r in data.train_records(2, n)]


def test_groups_hold_n_completions_per_prompt_in_order(tiny_model, tokenizer):
    eng = HFEngine(tiny_model, tokenizer, batch_size=5, progress=False)
    groups = eng.generate(prompts(3), 4, Sampling(temperature=1.0, max_tokens=4, seed=0))
    assert [len(g) for g in groups] == [4, 4, 4]
    for g, p in zip(groups, prompts(3)):
        expected = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for c in g:
            assert c.prompt_ids == list(expected) and 1 <= len(c.token_ids) <= 4
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


ENGINES = [HFEngine, GraphEngine]


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_is_deterministic_and_independent_of_chunking(tiny_model, tokenizer, engine):
    s = Sampling(temperature=0.0, max_tokens=6)
    a = engine(tiny_model, tokenizer, batch_size=64, progress=False).generate(prompts(5), 1, s)
    b = engine(tiny_model, tokenizer, batch_size=2, progress=False).generate(prompts(5), 1, s)
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]


@pytest.mark.parametrize("engine", ENGINES)
def test_sampling_seed_reproduces(tiny_model, tokenizer, engine):
    eng = engine(tiny_model, tokenizer, progress=False)
    s = Sampling(temperature=1.0, max_tokens=5, seed=7)
    first = [c.token_ids for g in eng.generate(prompts(2), 3, s) for c in g]
    assert first == [c.token_ids for g in eng.generate(prompts(2), 3, s) for c in g]


def test_stops_at_eos(tiny_model, tokenizer):
    # Make eos the only likely token: generation must stop after it.
    with torch.no_grad():
        tiny_model.lm_head.weight[tokenizer.eos_token_id] *= 0
        tiny_model.lm_head.weight[tokenizer.eos_token_id] += tiny_model.model.norm.weight * 50
    eng = HFEngine(tiny_model, tokenizer, progress=False)
    (c,), = eng.generate(prompts(1), 1, Sampling(temperature=0.0, max_tokens=8))
    assert c.token_ids[-1] == tokenizer.eos_token_id and c.finished and len(c.token_ids) <= 8


def test_unknown_engine_is_named(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="'sglang'"):
        build_engine("sglang", tiny_model, tokenizer)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_static_cache_and_compile_change_no_greedy_result(tiny_model, tokenizer, compile):
    s = Sampling(temperature=0.0, max_tokens=6)
    ref = HFEngine(tiny_model, tokenizer, progress=False).generate(prompts(5), 1, s)
    fast = HFEngine(tiny_model, tokenizer, progress=False, cache="static", compile=compile)
    for _ in range(2):  # the second call reuses the compiled step
        out = fast.generate(prompts(5), 1, s)
        assert [g[0].token_ids for g in out] == [g[0].token_ids for g in ref]


def test_hf_speed_switches_are_checked(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="rollout.hf_cache must be one of dynamic, static, got 'paged'"):
        HFEngine(tiny_model, tokenizer, cache="paged")
    with pytest.raises(ValueError, match="hf_compile needs rollout.hf_cache=static"):
        HFEngine(tiny_model, tokenizer, compile=True)


def test_shared_prompt_prefill_changes_no_sample(tiny_model, tokenizer, monkeypatch):
    s = Sampling(temperature=1.0, max_tokens=6, seed=11)
    eng = HFEngine(tiny_model, tokenizer, batch_size=7, progress=False)  # groups split across calls too
    calls = []
    real = HFEngine._shared_prefill
    monkeypatch.setattr(HFEngine, "_shared_prefill", lambda self, *a: calls.append(1) or real(self, *a))
    shared = eng.generate(prompts(3), 4, s)
    assert calls  # the prompts were prefilled once per group
    monkeypatch.setattr(HFEngine, "_shared_prefill", lambda self, *a: None)
    full = eng.generate(prompts(3), 4, s)
    assert [c.token_ids for g in shared for c in g] == [c.token_ids for g in full for c in g]


def test_inverse_cdf_sampler_draws_from_the_tempered_nucleus():
    from picorl.rollout.hf import InverseCDFSampler

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 200_000
    scores = logits.expand(rows, -1).clone()
    picked = InverseCDFSampler(temperature=0.7, top_p=1.0)(None, scores).argmax(-1)
    freq = torch.bincount(picked, minlength=6).double() / rows
    assert torch.allclose(freq, torch.softmax(logits.double() / 0.7, -1), atol=4e-3)
    # top-p 0.8 keeps the smallest set of tokens holding 80% of the mass: tokens 0-2 here.
    nucleus = InverseCDFSampler(temperature=1.0, top_p=0.8)(None, scores).argmax(-1)
    kept = torch.softmax(logits[:3].double(), -1)
    assert torch.allclose(torch.bincount(nucleus, minlength=6).double() / rows,
                          torch.cat([kept, torch.zeros(3, dtype=torch.double)]), atol=4e-3)


def test_inverse_cdf_never_picks_a_zero_probability_token():
    from picorl.rollout.sampling import sample_inverse_cdf

    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    assert sample_inverse_cdf(probs, torch.tensor([1.0, 1.0])).flatten().tolist() == [2, 1]
    assert sample_inverse_cdf(probs, torch.tensor([0.0, 0.0])).flatten().tolist() == [1, 0]
    assert sample_inverse_cdf(probs, torch.tensor([0.3, 0.49])).flatten().tolist() == [2, 0]


def test_two_level_inverse_cdf_picks_what_one_running_sum_over_the_vocabulary_picks():
    # The block masses and the running sum inside a block are float64 sums of the same float32
    # probabilities as one whole-vocabulary float64 running sum, in another order: they differ
    # by ~1e-16 of the total, so a draw could land on another token only within that of a
    # boundary, about 1e-13 of 20,000 uniform draws. 600 entries: two full blocks of 256 and
    # a padded third, the middle block all zeros; a draw exactly at the first block's mass
    # must skip it to the first non-zero entry after it.
    from picorl.rollout.sampling import BLOCK, sample_inverse_cdf

    torch.manual_seed(0)
    probs = torch.rand(20, 600) * (torch.rand(20, 600) < 0.5)
    probs[:, BLOCK:2 * BLOCK] = 0
    probs[:, 2 * BLOCK:2 * BLOCK + 3] = 0
    for _ in range(1000):
        uniform = torch.rand(20)
        cdf = probs.double().cumsum(-1)
        u = torch.minimum(uniform.double()[:, None] * cdf[:, -1:], torch.nextafter(cdf[:, -1:], torch.zeros(1).double()))
        want = torch.searchsorted(cdf, u, right=True)
        assert torch.equal(sample_inverse_cdf(probs, uniform), want)
    # Exact in binary: the first block holds half the mass, so uniform 0.5 lands on its edge.
    edge = torch.zeros(1, 600)
    edge[0, :BLOCK] = 1 / BLOCK
    edge[0, 2 * BLOCK + 3] = edge[0, 2 * BLOCK + 4] = 0.5
    assert sample_inverse_cdf(edge, torch.tensor([0.5])).item() == 2 * BLOCK + 3


def test_inverse_cdf_of_nan_probabilities_stays_inside_the_vocabulary():
    # A model whose weights went NaN: an index past the vocabulary would be a device-side assert
    # on a GPU (the gather of its log-prob), which ends the process's CUDA context.
    from picorl.rollout.sampling import sample_inverse_cdf

    probs = torch.tensor([[float("nan")] * 5, [0.2, 0.2, 0.2, 0.2, 0.2]])
    picks = sample_inverse_cdf(probs, torch.tensor([0.5, 0.5])).flatten().tolist()
    assert 0 <= picks[0] < 5 and picks[1] == 2
