"""The GRPO formulas on hand-computed numbers."""
import math

import pytest
import torch

from picorl.grpo import STD_EPS, aggregate, group_advantages, kl_penalty, policy_loss


def test_group_advantages_group_scale_and_zero_variance():
    adv, zero = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), 4, scale="group")
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    a = 0.5 / (s + STD_EPS)
    assert adv[:4].tolist() == pytest.approx([a, -a, -a, a])
    assert adv[4:].tolist() == [0, 0, 0, 0]
    assert zero.tolist() == [False, True]


def test_group_advantages_none_and_batch():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv, zero = group_advantages(r, 2, scale="none")
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0]) and zero.tolist() == [False, True]
    adv, _ = group_advantages(r, 2, scale="batch")
    bstd = r.std().item()  # unbiased over the whole batch
    assert adv.tolist() == pytest.approx([0.5 / (bstd + STD_EPS), -0.5 / (bstd + STD_EPS), 0, 0])


def test_group_advantages_rejects_ragged_and_bad_scale():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="'median'"):
        group_advantages(torch.zeros(4), 2, scale="median")


def test_ratio_one_gives_minus_advantage_and_its_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2), agg="seq")
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -1.0])  # -A / n_tokens


@pytest.mark.parametrize("ratio,adv,expected,clipped", [
    (1.5, 1.0, -1.2, True),     # above 1+eps_high with A>0: clipped at 1.2
    (1.1, 1.0, -1.1, False),    # inside the range
    (0.5, 1.0, -0.5, False),    # below 1-eps with A>0: min picks the unclipped r*A
    (0.5, -1.0, 0.8, True),     # below 1-eps_low with A<0: clipped at 0.8
    (1.5, -1.0, 1.5, False),    # above with A<0: min picks r*A (pessimistic)
])
def test_clip_boundaries_both_sides(ratio, adv, expected, clipped):
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, m = policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), eps_low=0.2, eps_high=0.2,
                          return_metrics=True)
    assert loss.item() == pytest.approx(expected)
    assert m["clip_frac"] == (1.0 if clipped else 0.0)
    loss.backward()
    assert (logp.grad.abs().item() == 0) == clipped  # a clipped token passes no gradient


def test_clip_higher_asymmetry():
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[math.log(1.25)]])
    assert policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), eps_high=0.2).item() == pytest.approx(-1.2)
    assert policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), eps_high=0.28).item() == pytest.approx(-1.25)


def test_each_aggregation_on_ragged_sequences():
    per_tok = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate(per_tok, mask, "seq").item() == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)  # 3.0
    assert aggregate(per_tok, mask, "token").item() == pytest.approx((1 + 2 + 3 + 4) / 4)        # 2.5
    assert aggregate(per_tok, mask, "dr_grpo").item() == pytest.approx(10 / (2 * 4))              # 1.25
    assert aggregate(per_tok, mask, "dr_grpo", max_len=10).item() == pytest.approx(10 / 20)
    with pytest.raises(ValueError, match="'mean'"):
        aggregate(per_tok, mask, "mean")


def test_policy_loss_aggregations_match_hand_numbers():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    # ratio 1: per-token loss is -A -> [[-1,-1,-1],[2,.,.]]
    assert policy_loss(logp, logp, adv, mask, agg="seq").item() == pytest.approx((-1 + 2) / 2)
    assert policy_loss(logp, logp, adv, mask, agg="token").item() == pytest.approx((-3 + 2) / 4)
    assert policy_loss(logp, logp, adv, mask, agg="dr_grpo").item() == pytest.approx((-3 + 2) / 6)


def test_kl_k3_is_zero_at_equality_and_positive_otherwise():
    lp = torch.tensor([[-1.0, -2.0]])
    assert kl_penalty(lp, lp, torch.ones(1, 2)).item() == 0.0
    d = 0.5
    assert kl_penalty(lp, lp + d, torch.ones(1, 2)).item() == pytest.approx(math.exp(d) - d - 1)


def test_distinct_rows_names_each_first_occurrence_and_maps_every_position():
    from picorl.batching import distinct_rows
    assert distinct_rows(["a", "a", "b", "a"]) == ([0, 2], [0, 0, 1, 0])
    assert distinct_rows([3, 1, 1, 3, 2]) == ([0, 1, 4], [0, 1, 1, 0, 2])


def test_left_padding_right_aligns_rows_and_positions_count_real_tokens():
    from picorl.batching import left_pad, left_pad_ids, positions
    ids, attn = left_pad_ids([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(attn).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert left_pad([[1], []], -100).tolist() == [[1], [-100]]


@pytest.fixture
def small_chunks(monkeypatch):
    from picorl.grpo import SelectedLogprobs
    monkeypatch.setattr(SelectedLogprobs, "CHUNK_ROWS", 5)  # 2 sequences of 3 positions a chunk: several chunks


def reference_logprobs(logits, targets):
    wide = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits.to(wide), -1).gather(-1, targets[..., None]).squeeze(-1)


def test_selected_logprobs_equal_log_softmax_and_its_gradient_in_float64(small_chunks):
    from picorl.grpo import selected_logprobs
    g = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(7, 4, 11, generator=g, dtype=torch.float64)).requires_grad_()
    logits = full[:, :-1]  # a non-contiguous view, as the trainer passes it
    targets = torch.randint(0, 11, (7, 3), generator=g)
    weights = torch.randn(7, 3, generator=g, dtype=torch.float64)
    got = selected_logprobs(logits, targets)
    (got * weights).sum().backward()
    got_grad, full.grad = full.grad.clone(), None
    want = reference_logprobs(logits, targets)
    (want * weights).sum().backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, full.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: selected_logprobs(x, targets), (logits.detach().requires_grad_(),))


def test_selected_logprobs_of_bf16_logits_match_the_float32_expression(small_chunks):
    from picorl.grpo import selected_logprobs
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(6, 3, 50, generator=g)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (6, 3), generator=g)
    got = selected_logprobs(logits, targets)
    got.sum().backward()
    got_grad, logits.grad = logits.grad.clone(), None
    want = reference_logprobs(logits, targets)
    want.sum().backward()
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    # The same float32 sums in another order: a few float32 ulps of values near 10.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Both gradients round float32 values that agree to ~1e-6 into bf16 (2^-8 apart): at most one step.
    torch.testing.assert_close(got_grad.float(), logits.grad.float(), rtol=2 ** -7, atol=0)
