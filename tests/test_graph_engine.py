"""The graph engine (picorl/rollout/graph.py) run eagerly on CPU: parity with the hf engine."""
import pytest
import torch
from conftest import trainer_logprobs

from picorl import data, models
from picorl.rollout import Sampling
from picorl.session import build_engine
from picorl.rollout.graph import GraphEngine, buckets_for
from picorl.rollout.hf import HFEngine


def prompts(n, difficulty=2):
    return [r["messages"] for r in data.train_records(difficulty, n)]


def perturb_adapter(model, std=0.5, seed=0):
    """A trained-looking adapter (peft starts B at zero, which changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def assert_greedy_equal(model, tok, ref, got, tie=1e-4):
    """Greedy tokens are equal; where they differ, the reference's top two logits must tie.

    The two engines compute the same function with different kernels (fused q/k/v, the
    adapter as its own matmuls), so logits agree to float32 rounding, about 1e-5 here. Two
    candidates closer than that may swap, and every later token may then differ; a gap of
    `tie` (10x the rounding) or more must never flip.
    """
    for x, y in zip(ref, got):
        assert x.prompt_ids == y.prompt_ids
        at = first_divergence(x.token_ids, y.token_ids)
        if at is None:
            continue
        ids = torch.tensor([x.prompt_ids + x.token_ids[:at]])
        with torch.no_grad():
            top = model(input_ids=ids).logits[0, -1].float().topk(2).values
        assert (top[0] - top[1]).item() < tie, (at, x.text, y.text)


def test_buckets_are_powers_of_two_then_the_batch_size():
    assert buckets_for(1) == [1]
    assert buckets_for(8) == [1, 2, 4, 8]
    assert buckets_for(96) == [1, 2, 4, 8, 16, 32, 64, 96]


def test_greedy_equals_hf_with_and_without_adapter_and_after_sync(tiny_model, tokenizer):
    model = models.add_lora(tiny_model, rank=4, alpha=8)
    s = Sampling(temperature=0.0, max_tokens=12)
    engine = GraphEngine(model, tokenizer, batch_size=4, progress=False)  # 6 prompts: chunks of 4 and 2
    hf = HFEngine(model, tokenizer, progress=False)
    assert_greedy_equal(model, tokenizer, [g[0] for g in hf.generate(prompts(6), 1, s)],
                        [g[0] for g in engine.generate(prompts(6), 1, s)])
    before = [g[0].token_ids for g in engine.generate(prompts(6), 1, s)]
    perturb_adapter(model)
    stale = [g[0].token_ids for g in engine.generate(prompts(6), 1, s)]
    assert stale == before  # the engine reads its own copy until synced
    engine.sync_weights(model)
    # Only the adapter trains, so only the engine's adapter buffers are copied.
    assert engine.last_sync_bytes == sum(t.numel() * t.element_size() for n, t in engine.dec.w.items() if "lora" in n)
    after = engine.generate(prompts(6), 1, s)
    assert_greedy_equal(model, tokenizer, [g[0] for g in hf.generate(prompts(6), 1, s)], [g[0] for g in after])
    assert [g[0].token_ids for g in after] != before


def test_a_float32_adapter_on_a_bf16_model_runs_in_the_models_dtype(tiny_model, tokenizer):
    """PEFT keeps adapter weights in float32 beside a bf16 base (as on a GPU run); the
    engine's buffers all take the base's dtype, on build and on every sync."""
    model = models.add_lora(tiny_model.to(torch.bfloat16), rank=4, alpha=8)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    engine = GraphEngine(model, tokenizer, batch_size=4, progress=False)
    assert {t.dtype for t in engine.dec.w.values()} == {torch.bfloat16}
    perturb_adapter(model)
    engine.sync_weights(model)
    a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(engine.dec.w["0.qkv.lora_a"][:a.shape[0]], a.to(torch.bfloat16))
    done = engine.generate(prompts(3), 2, Sampling(temperature=1.0, max_tokens=6, seed=0))
    assert [len(g) for g in done] == [2, 2, 2] and all(c.token_ids for g in done for c in g)


def test_a_bf16_engine_over_a_float32_model_decodes_as_the_model_cast_to_bf16(tiny_model, tokenizer):
    """rollout.dtype=bfloat16: the engine holds bf16 roundings of the float32 policy, on build
    and on every sync, and decodes exactly as an engine over the same model cast to bf16."""
    import copy
    model = models.add_lora(tiny_model, rank=4, alpha=8)
    perturb_adapter(model)
    engine = GraphEngine(model, tokenizer, batch_size=4, progress=False, dtype=torch.bfloat16)
    assert {t.dtype for t in engine.dec.w.values()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy itself is not cast
    s = Sampling(temperature=0.0, max_tokens=10)

    def same_as_cast(m):
        cast = copy.deepcopy(m).to(torch.bfloat16)
        # .to() rounds the rotary frequencies too; the engine takes its tables from the float32 ones
        rotary = cast.get_base_model().model.rotary_emb
        rotary.inv_freq = m.get_base_model().model.rotary_emb.inv_freq.clone()
        cast = GraphEngine(cast, tokenizer, batch_size=4, progress=False)
        assert [g[0].token_ids for g in engine.generate(prompts(6), 1, s)] == \
            [g[0].token_ids for g in cast.generate(prompts(6), 1, s)]
    same_as_cast(model)
    perturb_adapter(model, seed=1)
    engine.sync_weights(model)
    a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(engine.dec.w["0.qkv.lora_a"][:a.shape[0]], a.to(torch.bfloat16))
    same_as_cast(model)


def test_the_config_picks_the_engines_dtype(tiny_model, tokenizer):
    from picorl.config import ConfigError, load_config
    from picorl.session import engine_for_config, eval_engine
    for setting, want in [("model", torch.float32), ("bfloat16", torch.bfloat16),
                          ("auto", torch.bfloat16 if models.has_bf16_matmul() else torch.float32)]:
        cfg = load_config(None, ["rollout.engine=graph", f"rollout.dtype={setting}"])
        assert engine_for_config(cfg, tiny_model, tokenizer, progress=False).dec.dtype == want
        # Evals score the weights as saved, whatever rollouts sample in.
        assert eval_engine(cfg, tiny_model, tokenizer, progress=False).dec.dtype == torch.float32
    with pytest.raises(ConfigError, match="rollout.dtype=bfloat16 is the graph engine's"):
        load_config(None, ["rollout.engine=hf", "rollout.dtype=bfloat16"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_compiled_step_decodes_as_the_eager_one_across_buckets_and_syncs(tiny_model, tokenizer):
    model = models.add_lora(tiny_model, rank=4, alpha=8)
    perturb_adapter(model)
    s = Sampling(temperature=0.0, max_tokens=10)
    eager = GraphEngine(model, tokenizer, batch_size=4, progress=False)
    compiled = GraphEngine(model, tokenizer, batch_size=4, progress=False, compile_step=True)
    # 6 prompts: chunks of 4 and 2 rows, two buckets of one compile (row counts are symbolic).
    assert_greedy_equal(model, tokenizer, [g[0] for g in eager.generate(prompts(6), 1, s)],
                        [g[0] for g in compiled.generate(prompts(6), 1, s)])
    perturb_adapter(model, seed=1)  # the compiled step reads the engine's buffers, which sync fills
    eager.sync_weights(model)
    compiled.sync_weights(model)
    assert_greedy_equal(model, tokenizer, [g[0] for g in eager.generate(prompts(6), 1, s)],
                        [g[0] for g in compiled.generate(prompts(6), 1, s)])
    sampled = compiled.generate(prompts(2), 3, Sampling(temperature=1.0, max_tokens=6, seed=0))
    assert [len(g) for g in sampled] == [3, 3]
    logprobs = trainer_logprobs(model, tokenizer, [c for g in sampled for c in g])
    for c, ref in zip((c for g in sampled for c in g), logprobs):
        assert c.logprobs == pytest.approx(ref, abs=2e-3)


def test_the_config_passes_graph_compile_to_the_engine(tiny_model, tokenizer):
    from picorl.config import load_config
    from picorl.session import engine_for_config
    cfg = load_config(None, ["rollout.engine=graph", "rollout.graph_compile=true"])
    assert engine_for_config(cfg, tiny_model, tokenizer, progress=False).compile_step
    assert not engine_for_config(load_config(None, ["rollout.engine=graph"]), tiny_model, tokenizer).compile_step


def test_full_finetuning_sync_copies_every_weight(tiny_model, tokenizer):
    tiny_model.requires_grad_(True)
    s = Sampling(temperature=0.0, max_tokens=8)
    engine = GraphEngine(tiny_model, tokenizer, batch_size=8, progress=False)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.5 if p.dim() == 2 else 0.1)
    engine.sync_weights(tiny_model)
    hf = HFEngine(tiny_model, tokenizer, progress=False)
    assert_greedy_equal(tiny_model, tokenizer, [g[0] for g in hf.generate(prompts(4), 1, s)],
                        [g[0] for g in engine.generate(prompts(4), 1, s)])


def test_sampled_logprobs_are_the_trainers(tiny_model, tokenizer):
    model = models.add_lora(tiny_model, rank=4, alpha=8)
    perturb_adapter(model, std=0.2)
    engine = GraphEngine(model, tokenizer, batch_size=8, progress=False)
    groups = engine.generate(prompts(3), 4, Sampling(temperature=1.0, max_tokens=10, seed=3))
    flat = [c for g in groups for c in g]
    for c, ours in zip(flat, trainer_logprobs(model, tokenizer, flat)):
        assert len(c.logprobs) == len(c.token_ids)
        assert c.logprobs == pytest.approx(ours, abs=2e-3)


def test_groups_map_back_to_their_prompts_across_chunks_and_lengths(tiny_model, tokenizer):
    # Prompts of different lengths (d1 and d6 strings), 3 samples each, in chunks of 5 rows
    # (larger than no bucket but 5 itself: buckets 1, 2, 4, 5), so groups straddle chunks.
    ps = prompts(2, difficulty=1) + prompts(2, difficulty=6)
    engine = GraphEngine(tiny_model, tokenizer, batch_size=5, progress=False)
    groups = engine.generate(ps, 3, Sampling(temperature=1.0, max_tokens=6, seed=0))
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    assert len({len(g[0].prompt_ids) for g in groups}) > 1
    for g, p in zip(groups, ps):
        want = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for c in g:
            assert c.prompt_ids == list(want) and 1 <= len(c.token_ids) <= 6
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # Each completion continues its own prompt: the trainer's log-probs of it, given that
    # prompt, are the ones the engine reported while sampling.
    flat = [c for g in groups for c in g]
    for c, ours in zip(flat, trainer_logprobs(tiny_model, tokenizer, flat)):
        assert c.logprobs == pytest.approx(ours, abs=2e-3)


def test_stops_at_a_stop_token_and_at_max_tokens(tiny_model, tokenizer):
    engine = GraphEngine(tiny_model, tokenizer, progress=False)
    (c,), = engine.generate(prompts(1), 1, Sampling(temperature=0.0, max_tokens=5))
    assert len(c.token_ids) == 5 and not c.finished  # the random model never says eos first
    with torch.no_grad():  # make eos the only likely token
        tiny_model.lm_head.weight[tokenizer.eos_token_id] *= 0
        tiny_model.lm_head.weight[tokenizer.eos_token_id] += tiny_model.model.norm.weight * 50
    engine = GraphEngine(tiny_model, tokenizer, progress=False, check_every=2)
    groups = engine.generate(prompts(3), 2, Sampling(temperature=0.0, max_tokens=40))
    for c in (c for g in groups for c in g):
        assert c.token_ids == [tokenizer.eos_token_id] and c.finished and c.text == ""


def test_rows_that_stop_leave_the_batch_and_change_no_token(tiny_model, tokenizer):
    # An eleventh of the vocabulary stops a row, so the random model's sampled rows stop after
    # a few tokens or run on to max_tokens: the compacted loop drops stopped rows several
    # times. (Greedy, the random model repeats one token; the embedded model's greedy parity
    # with the hf engine below runs compacted, with real stops.)
    model = models.add_lora(tiny_model, rank=4, alpha=8)
    perturb_adapter(model, std=0.2)
    ps = prompts(3, difficulty=1) + prompts(3, difficulty=5)
    sampling = Sampling(temperature=1.0, max_tokens=24, seed=5)
    out = {}
    for compact in (False, True):
        engine = GraphEngine(model, tokenizer, batch_size=16, progress=False, compact=compact)
        engine.stops = torch.arange(3, model.config.vocab_size, 11)
        out[compact] = ([c for g in engine.generate(ps, 4, sampling) for c in g], engine.row_steps)
    (plain, plain_work), (compacted, work) = out[False], out[True]
    lengths = sorted(len(c.token_ids) for c in plain)
    assert lengths[0] < 4 and lengths[-1] == 24 and len(set(lengths)) > 5, lengths
    assert work < plain_work
    # Each row keeps its own uniform, so a token could differ only where a draw falls within
    # float32 rounding (~1e-6) of a cumulative-probability boundary.
    assert [c.token_ids for c in compacted] == [c.token_ids for c in plain]
    for a, b in zip(plain, compacted):
        # the same kernels on fewer rows: float32 rounding, ~1e-6; 1e-4 as assert_greedy_equal's tie
        assert b.finished == a.finished and b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    # moved rows read their own cache, pad and positions: the trainer's log-probs agree
    for c, ours in zip(compacted, trainer_logprobs(model, tokenizer, compacted)):
        assert c.logprobs == pytest.approx(ours, abs=2e-3)


def test_greedy_rows_ride_among_sampled_rows_and_keep_the_argmax_as_rows_move(tiny_model, tokenizer):
    # generate_with_greedy: 4 samples then the greedy answer per prompt, 30 rows in chunks of
    # 16, so chunks mix greedy and sampled rows; stops as above make the compacted loop move
    # rows, and a greedy flag left behind would sample a moved greedy row or argmax a sample.
    model = models.add_lora(tiny_model, rank=4, alpha=8)
    perturb_adapter(model, std=0.2)
    ps = prompts(3, difficulty=1) + prompts(3, difficulty=5)
    engine = GraphEngine(model, tokenizer, batch_size=16, progress=False)
    engine.stops = torch.arange(3, model.config.vocab_size, 11)
    groups = engine.generate_with_greedy(ps, 4, Sampling(temperature=1.0, max_tokens=24, seed=5))
    assert [len(g) for g in groups] == [5] * 6
    flat = [c for g in groups for c in g]
    assert len({len(c.token_ids) for c in flat}) > 5  # rows stopped at many steps: compaction ran
    with torch.no_grad():
        for g in groups:
            c = g[-1]
            logits = model(input_ids=torch.tensor([c.prompt_ids + c.token_ids])).logits[0, len(c.prompt_ids) - 1:-1]
            top = logits.float().topk(2)
            for i, t in enumerate(c.token_ids):  # the argmax, but for a top-two tie within rounding
                assert t == top.indices[i, 0] or (top.values[i, 0] - top.values[i, 1]).item() < 1e-4, (i, c.token_ids)
    # every member's log-probs, greedy or sampled, are the policy's at the tokens it chose
    for c, ours in zip(flat, trainer_logprobs(model, tokenizer, flat)):
        assert c.logprobs == pytest.approx(ours, abs=2e-3)
    alone = engine.generate(ps, 1, Sampling(temperature=0.0, max_tokens=24))
    assert_greedy_equal(model, tokenizer, [g[0] for g in alone], [g[-1] for g in groups])


def test_sampling_follows_the_tempered_nucleus():
    from picorl.rollout.sampling import sample_tokens

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 200_000
    scores = logits.expand(rows, -1).clone()
    # 200k draws: a frequency's standard error is at most sqrt(0.25 / 200k) = 1.1e-3, so
    # 4e-3 is 3.6 standard errors: a correct sampler fails it about once in 3,000 runs of
    # one cell, and a wrong distribution (off by >= 1e-2 here) cannot pass it.
    picked = sample_tokens(scores, 0.7, 1.0, torch.rand(rows), nucleus=False)
    freq = torch.bincount(picked, minlength=6).double() / rows
    assert torch.allclose(freq, torch.softmax(logits.double() / 0.7, -1), atol=4e-3)
    # top-p 0.8 keeps the smallest set of tokens holding 80% of the mass: tokens 0-2 here.
    nucleus = sample_tokens(scores, torch.tensor([1.0]), torch.tensor([0.8]), torch.rand(rows), nucleus=True)
    kept = torch.softmax(logits[:3].double(), -1)
    assert torch.allclose(torch.bincount(nucleus, minlength=6).double() / rows,
                          torch.cat([kept, torch.zeros(3, dtype=torch.double)]), atol=4e-3)


def test_unsupported_models_are_named(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="not 'gpt2'; use rollout.engine=hf"):
        GraphEngine(gpt2, tokenizer)


def test_the_config_selects_it(tiny_model, tokenizer):
    assert isinstance(build_engine("graph", tiny_model, tokenizer, batch_size=16), GraphEngine)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_greedy_equals_hf_on_the_embedded_model_at_d6():
    torch.manual_seed(0)
    model, tok = models.load_model(models.EMBEDDED, device="cpu", dtype="float32")
    model = models.add_lora(model, rank=8, alpha=16)
    perturb_adapter(model, std=0.02)  # moves the greedy tokens, keeps the text a model's
    ps = [r["messages"] for r in data.eval_records(6, 8)]
    s = Sampling(temperature=0.0, max_tokens=32)
    hf = HFEngine(model, tok, progress=False)
    engine = GraphEngine(model, tok, batch_size=8, progress=False)
    ref = [g[0] for g in hf.generate(ps, 1, s)]
    assert_greedy_equal(model, tok, ref, [g[0] for g in engine.generate(ps, 1, s)])
    perturb_adapter(model, std=0.02, seed=1)
    engine.sync_weights(model)
    moved = [g[0] for g in hf.generate(ps, 1, s)]
    assert [c.token_ids for c in moved] != [c.token_ids for c in ref]
    got = [g[0] for g in engine.generate(ps, 1, s)]
    assert_greedy_equal(model, tok, moved, got)
    for c, ours in zip(got, trainer_logprobs(model, tok, got)):
        assert c.logprobs == pytest.approx(ours, abs=2e-3)


def test_one_cache_serves_every_call_that_fits_and_a_longer_call_replaces_it(tiny_model, tokenizer):
    engine = GraphEngine(tiny_model, tokenizer, batch_size=4, progress=False)
    engine.generate(prompts(2), 2, Sampling(temperature=1.0, max_tokens=40, seed=0))
    (first,) = engine.states
    engine.generate(prompts(2), 1, Sampling(temperature=0.0, max_tokens=8))  # fits: same cache
    assert list(engine.states) == [first]
    engine.generate(prompts(1), 1, Sampling(temperature=0.0, max_tokens=first + 1))
    (longer,) = engine.states
    assert longer > first and longer % 128 == 0
