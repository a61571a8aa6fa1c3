"""The GRPO formulas on hand-computed numbers."""
import math

import pytest
import torch

from picorl.grpo import STD_EPS, aggregate, group_advantages, kl_penalty, overlong_penalty, policy_loss


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


def test_overlong_penalty_at_the_edges_of_its_buffer():
    # max_tokens 96, buffer 16: nothing up to 80 tokens, then -1/16 a token down to -1 at 96.
    assert overlong_penalty(1, 96, 16) == 0.0
    assert overlong_penalty(80, 96, 16) == 0.0
    assert overlong_penalty(81, 96, 16) == pytest.approx(-1 / 16)
    assert overlong_penalty(88, 96, 16) == pytest.approx(-0.5)
    assert overlong_penalty(96, 96, 16) == -1.0
    assert overlong_penalty(500, 96, 16) == -1.0  # never below -1, whatever an engine returns
    assert overlong_penalty(96, 96, 0) == 0.0  # buffer 0: off
    assert overlong_penalty(96, 96, 96) == -1.0 and overlong_penalty(0, 96, 96) == 0.0
    with pytest.raises(ValueError, match="longer than max_tokens"):
        overlong_penalty(10, 96, 97)
