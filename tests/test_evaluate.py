"""Paired comparison of two evals of one held-out set: items gained and lost, the sign test."""
import math

import pytest

from picorl.evaluate import paired_change, sign_test


def test_sign_test_on_hand_computed_tails():
    # n = 4 changed items, 3 against 1: P(X <= 1) = (1 + 4) / 16, two-sided 10/16.
    assert sign_test(3, 1) == pytest.approx(10 / 16)
    assert sign_test(1, 3) == pytest.approx(10 / 16)
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(2, 2) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(41, 7) == pytest.approx(2 * sum(math.comb(48, i) for i in range(8)) / 2 ** 48)
    assert sign_test(41, 7) < 1e-6


def item(s, exact):
    return {"string": s, "letters": ["a"], "exact": exact}


def test_paired_change_counts_gained_and_lost_items():
    before = [item("a", 1.0), item("b", 0.0), item("c", 0.0), item("d", 1.0)]
    after = [item("a", 1.0), item("b", 1.0), item("c", 1.0), item("d", 0.0)]
    got = paired_change(before, after)
    assert got == {"n": 4, "before": 0.5, "after": 0.75, "gained": 2, "lost": 1, "p_value": sign_test(2, 1)}


def test_paired_change_refuses_two_different_sets():
    with pytest.raises(ValueError, match="3 and 2 items"):
        paired_change([item("a", 1)] * 3, [item("a", 1)] * 2)
    with pytest.raises(ValueError, match="item 1 differs"):
        paired_change([item("a", 1), item("b", 1)], [item("a", 1), item("x", 1)])
