import math
import random
import statistics

import pytest
import torch

from picorl import data, evaluate, models, sft
from picorl.batching import chat_prompt_ids
from picorl.envs import letter_counting as lc
from picorl.envs.letter_counting import grade


def test_every_style_parses_to_the_true_answer(tokenizer):
    for d in (1, 2, 5, 6, 9):
        for r in data.train_records(d, 30):
            for style in lc.STYLES:
                g = grade(sft.demonstration(r, style, tokenizer), r["letters"], r["answer"])
                assert g["exact"] == 1.0, (style, r)


def test_cot_spells_every_character_with_running_tallies():
    r = {"string": "banana", "letters": ["a", "n"], "answer": {"a": 3, "n": 2}}
    assert sft.demonstration(r, "cot") == \
        '<think>b a1 n1 a2 n2 a3</think>\n<answer>{"a": 3, "n": 2}</answer>'
    one = {"string": "apple", "letters": ["p"], "answer": {"p": 2}}
    assert sft.demonstration(one, "cot") == "<think>a p1 p2 l e</think>\n<answer>2</answer>"
    assert sft.demonstration(one, "direct") == "<answer>2</answer>"
    with pytest.raises(ValueError, match="'long'"):
        sft.demonstration(one, "long")


def test_cot_tokens_spells_the_prompt_tokens_line_by_line(tokenizer):
    r = {"string": "banana", "letters": ["a", "n"], "answer": {"a": 3, "n": 2}}
    assert lc.cot_tokens_text(["ban", "ana"], r["letters"]) == "<think>\nban: b a1 n1\nana: a2 n2 a3\n</think>\n"
    with pytest.raises(ValueError, match="pass the tokenizer"):
        sft.demonstration(r, "cot_tokens")
    # Each line's head, as the target itself tokenizes, is the very token id the prompt
    # holds for that piece of the string: copying the next piece is a lookup.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    for rec in data.eval_records(6, 16) + data.eval_records(3, 16):
        prompt = chat_prompt_ids(tokenizer, data.messages_of(rec))
        piece_ids = tokenizer(rec["string"], add_special_tokens=False)["input_ids"]
        assert any(prompt[i:i + len(piece_ids)] == piece_ids for i in range(len(prompt)))
        assert "".join(lc.string_tokens(tokenizer, rec["string"])) == rec["string"]
        target = tokenizer(sft.demonstration(rec, "cot_tokens", tokenizer), add_special_tokens=False)["input_ids"]
        heads = [target[i + 1] for i, t in enumerate(target) if t == newline[0]][:len(piece_ids)]
        assert heads == piece_ids, rec["string"]


def test_cot_fits_d6_in_its_token_budget(tokenizer):
    # Figures quoted in sft.py's docstring: mean ~157, max ~202 tokens at d6.
    lengths = [len(tokenizer(sft.demonstration(r, "cot"), add_special_tokens=False).input_ids)
               for r in data.eval_records(6, 64)]
    assert 140 < statistics.mean(lengths) < 175 and max(lengths) <= 256
    # cot_tokens: mean ~265, max ~345, inside configs/gpu.yaml's 384.
    lengths = [len(tokenizer(sft.demonstration(r, "cot_tokens", tokenizer), add_special_tokens=False).input_ids)
               for r in data.eval_records(6, 64)]
    assert 240 < statistics.mean(lengths) < 290 and max(lengths) <= 384


def test_loss_covers_assistant_tokens_only(tokenizer):
    r = data.train_records(2, 1)[0]
    ids, labels = sft.encode_example(tokenizer, r, "direct")
    target = [t for t in labels if t != -100]
    assert tokenizer.decode(target) == sft.demonstration(r, "direct") + tokenizer.eos_token
    assert ids[-len(target):] == target and labels[:len(ids) - len(target)] == [-100] * (len(ids) - len(target))


def test_shared_prefix_length_stops_before_targets_and_leaves_every_row_a_token():
    row = lambda ids, first_target: (ids, [-100] * first_target + ids[first_target:])  # noqa: E731
    assert sft.shared_prefix_length([row([1, 2, 3, 4], 3), row([1, 2, 3, 5, 6], 3)]) == 3
    assert sft.shared_prefix_length([row([1, 2, 3, 4], 2), row([1, 2, 3, 5, 6], 3)]) == 2  # a target at 2
    assert sft.shared_prefix_length([row([1, 2, 3], 3), row([1, 2, 3, 5], 3)]) == 2  # [1, 2, 3] must keep a token
    assert sft.shared_prefix_length([row([1, 2, 3], 3), row([1, 7, 3], 3)]) == 1
    assert sft.shared_prefix_length([row([1, 2, 3], 0), row([1, 2, 3], 3)]) == 0


def test_shared_prefix_loss_and_gradients_equal_the_full_batch(tokenizer):
    from test_trainer import float64_norms
    # float64, as tests/test_trainer.py's shared-prefix check and for its reason: the two
    # paths sum the same terms in other orders, within about n x 1.1e-16 relative.
    model = models.add_lora(float64_norms(models.tiny_llama(len(tokenizer), initializer_range=0.3)),
                            rank=4, alpha=8).double()
    with torch.no_grad():  # a non-zero adapter, so its gradients depend on the prefix's keys/values
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = sft.encode_records(tokenizer, [r for d in (1, 3) for r in data.train_records(d, 3)], "cot", progress=False)
    prefix = sft.shared_prefix_length(batch)
    system = chat_prompt_ids(tokenizer, data.messages_of(data.train_records(1, 1)[0]))
    assert 0 < prefix < len(system) and all(ids[:prefix] == batch[0][0][:prefix] for ids, _ in batch)

    def loss_and_grads(shared: bool):
        model.zero_grad()
        loss = sft.batch_gradients(model, params, batch, tokenizer.pad_token_id, shared_prefix=shared)
        return loss, [p.grad.clone() for p in params]
    loss_shared, g_shared = loss_and_grads(True)
    loss_full, g_full = loss_and_grads(False)
    assert loss_shared == pytest.approx(loss_full, rel=1e-9)
    for a, b in zip(g_shared, g_full):
        assert (a - b).norm() <= 1e-9 * b.norm() + 1e-12
    assert any(a.abs().sum() > 0 for a in g_shared)


@pytest.mark.parametrize("style", lc.STYLES)
def test_records_tokenized_in_chunks_match_one_at_a_time(tokenizer, style, monkeypatch):
    # Chunks of 7 make the last chunk partial; each record is built the slow, obvious way.
    monkeypatch.setattr(sft, "ENCODE_CHUNK", 7)
    recs = [r for d in (1, 3, 6) for r in data.train_records(d, 8)]
    for rec, (ids, labels) in zip(recs, sft.encode_records(tokenizer, recs, style, progress=False), strict=True):
        prompt = chat_prompt_ids(tokenizer, data.messages_of(rec))
        target = tokenizer(sft.demonstration(rec, style, tokenizer), add_special_tokens=False)["input_ids"]
        assert ids == prompt + target + [tokenizer.eos_token_id]
        assert labels == [-100] * len(prompt) + target + [tokenizer.eos_token_id]


def test_random_batches_are_the_seeded_draws_with_replacement():
    batches = sft.SFTBatches([5] * 10, batch_size=4, seed=3, group_by_length=False)
    for step in (0, 7):
        rng = random.Random(f"sft/3/{step}")
        assert batches(step) == [rng.randrange(10) for _ in range(4)]


def test_length_batches_cover_each_epoch_once_with_rows_of_like_length(tokenizer):
    recs = [r for d in range(1, 7) for r in data.train_records(d, 96)]
    lengths = [len(ids) for ids, _ in sft.encode_records(tokenizer, recs, "cot", progress=False)]
    by_length = sft.SFTBatches(lengths, batch_size=32, seed=0, group_by_length=True)
    assert by_length.per_epoch == 18
    for epoch in (0, 1):
        steps = range(epoch * 18, (epoch + 1) * 18)
        seen = sorted(i for s in steps for i in by_length(s))
        assert seen == list(range(len(recs)))  # 576 = 18 x 32: every example once
    assert by_length(0) != by_length(18)  # each epoch reshuffles

    def real_share(batches, steps):
        rows = [[lengths[i] for i in batches(s)] for s in steps]
        return sum(map(sum, rows)) / sum(max(r) * len(r) for r in rows)

    # Random batches of 32 are about half padding (sft.py's docstring: 48% real tokens on
    # d1-d6 cot); sorted windows leave a few percent.
    random_share = real_share(sft.SFTBatches(lengths, 32, 0, False), range(18))
    assert random_share < 0.6 and real_share(by_length, range(36)) > 0.9
    # Batches are a function of (seed, step): a fresh plan, asked out of order, agrees.
    fresh = sft.SFTBatches(lengths, 32, 0, True)
    assert [fresh(s) for s in (20, 3, 35)] == [by_length(s) for s in (20, 3, 35)]


def test_length_batches_cycle_when_there_are_fewer_examples_than_a_batch():
    batches = sft.SFTBatches([3, 1, 2], batch_size=8, seed=0, group_by_length=True)
    assert batches.per_epoch == 1
    batch = batches(0)
    assert len(batch) == 8 and set(batch) == {0, 1, 2}
    with pytest.raises(ValueError, match="at least one demonstration"):
        sft.SFTBatches([], batch_size=8, seed=0, group_by_length=True)


def test_sft_on_tiny_model_reduces_loss_and_is_resumable(tokenizer):
    recs = data.train_records(1, 50)
    model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=8, alpha=16)
    seen = []
    log = sft.train_sft(model, tokenizer, recs, style="direct", steps=12, batch_size=4, lr=5e-3,
                        on_step=lambda s, l: seen.append(s), progress=False)
    losses = [m["sft/loss"] for m in log]
    assert seen == list(range(1, 13)) and losses[-1] < losses[0]
    assert all(m["sft/skipped"] == 0.0 and m["sft/grad_norm"] > 0 for m in log)
    # Step s always sees the same batch: a run resumed at step 6 computes the same first loss.
    m2 = models.add_lora(models.tiny_llama(len(tokenizer)), rank=8, alpha=16)
    again = sft.train_sft(m2, tokenizer, recs, style="direct", steps=1, batch_size=4, lr=5e-3, progress=False)
    assert again[0]["sft/loss"] == pytest.approx(losses[0])


def test_lr_schedules_follow_their_formula():
    assert [sft.sft_lr(s, 100, 1e-3) for s in (0, 50, 99)] == [1e-3] * 3
    # cosine: 1e-3 x (1 + cos(pi x s / 100)) / 2
    assert sft.sft_lr(0, 100, 1e-3, "cosine") == pytest.approx(1e-3)
    assert sft.sft_lr(50, 100, 1e-3, "cosine") == pytest.approx(5e-4)
    assert sft.sft_lr(99, 100, 1e-3, "cosine") == pytest.approx(1e-3 * (1 + math.cos(math.pi * 0.99)) / 2)
    assert 0 < sft.sft_lr(99, 100, 1e-3, "cosine") < 3e-7  # the last step still moves, a little
    assert sft.sft_lr(75, 100, 1e-3, "linear") == pytest.approx(2.5e-4)
    # warmup 10: 1e-4, 2e-4, ... 1e-3 at step 9; the decay then runs over the 90 steps left
    assert [sft.sft_lr(s, 100, 1e-3, "cosine", 10) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert sft.sft_lr(10, 100, 1e-3, "cosine", 10) == pytest.approx(1e-3)
    assert sft.sft_lr(55, 100, 1e-3, "cosine", 10) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="sft.lr_schedule must be one of constant, cosine, linear, got 'step'"):
        sft.sft_lr(0, 10, 1e-3, "step")


def test_a_resumed_sft_sets_the_rate_the_whole_run_would(tokenizer):
    recs = data.train_records(1, 40)
    kw = dict(style="direct", steps=8, batch_size=4, lr=5e-3, lr_schedule="cosine", warmup_steps=2, progress=False)
    torch.manual_seed(0)
    whole = sft.train_sft(models.add_lora(models.tiny_llama(len(tokenizer)), rank=4, alpha=8), tokenizer, recs, **kw)
    torch.manual_seed(0)
    tail = sft.train_sft(models.add_lora(models.tiny_llama(len(tokenizer)), rank=4, alpha=8), tokenizer, recs,
                         start_step=5, **kw)
    assert [m["sft/lr"] for m in whole] == [sft.sft_lr(s, 8, 5e-3, "cosine", 2) for s in range(8)]
    assert [m["sft/lr"] for m in tail] == [m["sft/lr"] for m in whole[5:]]
    # The rate reaches the optimizer, whatever rate the optimizer was built with.
    model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=4, alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sft.train_sft(model, tokenizer, recs, optimizer=opt, **{**kw, "steps": 3, "warmup_steps": 0})
    assert opt.param_groups[0]["lr"] == pytest.approx(sft.sft_lr(2, 3, 5e-3, "cosine"))


def poison_gradients(model, calls: set[int]):
    """Make the gradient of one adapter weight infinite on the given backward calls (1-based)."""
    p = next(p for n, p in model.named_parameters() if "lora_B" in n)
    count = [0]

    def hook(grad):
        count[0] += 1
        return grad + float("inf") if count[0] in calls else grad
    p.register_hook(hook)


def test_a_step_with_an_infinite_gradient_is_skipped_and_changes_nothing(tokenizer):
    recs = data.train_records(1, 40)
    model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=4, alpha=8)
    poison_gradients(model, {2})
    weights = []
    log = sft.train_sft(model, tokenizer, recs, style="direct", steps=4, batch_size=4, lr=5e-3, progress=False,
                        on_step=lambda s, l: weights.append([p.detach().clone() for p in model.parameters()
                                                             if p.requires_grad]))
    assert [m["sft/skipped"] for m in log] == [0.0, 1.0, 0.0, 0.0]
    assert math.isfinite(log[1]["sft/loss"]) and not math.isfinite(log[1]["sft/grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # step 2 moved nothing
    assert not all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 3 trained again
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sft_stops_after_too_many_non_finite_steps_in_a_row(tokenizer):
    recs = data.train_records(1, 40)
    model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=4, alpha=8)
    poison_gradients(model, {2, 3, 4})
    with pytest.raises(sft.NonFiniteSteps, match=r"3 steps in a row .*\(last at step 4"):
        sft.train_sft(model, tokenizer, recs, style="direct", steps=10, batch_size=4, lr=5e-3,
                      max_skips_in_a_row=3, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_length_grouped_sft_resumed_midway_trains_on_that_step_s_batch(tokenizer):
    # 50 records / 4 per batch: 12 steps an epoch, so step 14 is in the second epoch.
    recs = data.train_records(2, 50)
    torch.manual_seed(1)
    model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=8, alpha=16).train()
    examples = sft.encode_records(tokenizer, recs, "cot", progress=False)
    batch = [examples[i] for i in sft.SFTBatches([len(x) for x, _ in examples], 4, 0, True)(14)]
    expected = sft.sft_loss(model, *sft.collate(batch, tokenizer.pad_token_id)).item()
    resumed = sft.train_sft(model, tokenizer, recs, style="cot", batch_size=4, lr=5e-3, group_by_length=True,
                            steps=15, start_step=14, progress=False)
    # train_sft divides the summed loss by the token count (as data parallel ranks do), the
    # mean divides inside cross_entropy: the same float32 numbers, rounded once differently.
    assert [m["sft/loss"] for m in resumed] == [pytest.approx(expected, rel=1e-6)]


@pytest.mark.slow
def test_sft_on_embedded_model_teaches_the_format_at_d1():
    torch.manual_seed(0)
    model, tok = models.load_model(models.EMBEDDED, device="cpu")
    held_out = data.eval_records(1, 12)
    before, _ = evaluate.evaluate_records(model, tok, held_out, max_tokens=40, progress=False)
    model = models.add_lora(model, rank=16, alpha=32)
    sft.train_sft(model, tok, data.train_records(1, 200), style="cot", steps=10, batch_size=4,
                  lr=1e-3, progress=False)
    after, items = evaluate.evaluate_records(model, tok, held_out, max_tokens=40, progress=False)
    assert before["formatted"] <= 0.25
    assert after["formatted"] >= 0.75, items[:3]


@pytest.mark.slow
def test_compiled_sft_trains_as_the_eager_one_does(tokenizer):
    """sft.compile: Inductor's forward and backward compute what eager does, up to the order
    of float32 sums (each ~1e-7 relative; a few steps of Adam keep that far below 1e-4)."""
    recs = data.train_records(2, 24)
    kw = dict(style="cot", steps=3, batch_size=3, lr=5e-3, progress=False)
    logs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=4, alpha=8)
        logs[compiled] = sft.train_sft(model, tokenizer, recs, compile_forward=compiled, **kw)
    for eager, fused in zip(logs[False], logs[True]):
        assert fused["sft/loss"] == pytest.approx(eager["sft/loss"], rel=1e-4)
        assert fused["sft/grad_norm"] == pytest.approx(eager["sft/grad_norm"], rel=1e-4)
    assert logs[True][0]["sft/loss"] != logs[True][-1]["sft/loss"]  # it trained
