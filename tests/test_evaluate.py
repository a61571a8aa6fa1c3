"""Paired comparison of two evals of one held-out set: items gained and lost, the sign test;
sampled accuracy and pass@k beside the greedy answer."""
import math

import pytest

from picorl.envs.base import Grade
from picorl.envs.letter_counting import LetterCounting
from picorl.evaluate import evaluate_records, item_fields, paired_change, sign_test, summarise
from picorl.metrics import eval_metrics, parse_eval_metric


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


# ---------------------------------------------------------------- sampled accuracy and pass@k

def sampled_item(s, exact, sampled):
    return {**item(s, exact), "partial": exact, "formatted": 1.0, "sampled": sampled}


def test_summary_holds_sampled_accuracy_and_pass_at_k_only_when_sampled():
    # 4 samples an item: 0, 1, 3 and 4 of them right -> sampled (0 + .25 + .75 + 1) / 4, pass@4 3 of 4
    items = [sampled_item("a", 0.0, 0.0), sampled_item("b", 0.0, 0.25), sampled_item("c", 1.0, 0.75),
             sampled_item("d", 1.0, 1.0)]
    s = summarise(items)
    assert s["sampled"] == pytest.approx(0.5) and s["pass_at_k"] == 0.75 and s["exact"] == 0.5
    greedy_only = summarise([{k: v for k, v in i.items() if k != "sampled"} for i in items])
    assert "sampled" not in greedy_only and "pass_at_k" not in greedy_only
    assert eval_metrics({3: s}) == {"eval/acc_d3": 0.5, "eval/partial_d3": 0.5, "eval/format_d3": 1.0,
                                    "eval/sampled_d3": pytest.approx(0.5), "eval/pass_d3": 0.75}
    assert set(eval_metrics({3: greedy_only})) == {"eval/acc_d3", "eval/partial_d3", "eval/format_d3"}
    assert parse_eval_metric("eval/pass_d3") == ("pass", 3) and parse_eval_metric("eval/passes_d3") is None


def test_paired_change_pairs_sampled_fractions_item_by_item():
    before = [sampled_item("a", 0.0, 0.0), sampled_item("b", 0.0, 0.25), sampled_item("c", 1.0, 0.75),
              sampled_item("d", 1.0, 1.0)]
    after = [sampled_item("a", 0.0, 0.5), sampled_item("b", 0.0, 0.75), sampled_item("c", 1.0, 0.75),
             sampled_item("d", 1.0, 0.75)]
    got = paired_change(before, after)
    # greedy moved on no item; the samples rose on a and b, held on c, fell on d
    assert (got["gained"], got["lost"]) == (0, 0)
    assert got["sampled"] == {"before": 0.5, "after": 0.6875, "rose": 2, "fell": 1, "p_value": sign_test(2, 1),
                              "pass_before": 0.75, "pass_after": 1.0}
    assert item_fields(after)[-1] == "sampled" and "sampled" not in item_fields([item("a", 1.0)])
    # an eval without samples on one side: no sampled pair, and still the same items
    assert "sampled" not in paired_change(before, [item("a", 0), item("b", 0), item("c", 1), item("d", 1)])


class _LengthOfThree(LetterCounting):
    """Letter counting's prompts; a completion is 'right' when its text length is a multiple of 3,
    so a random model's samples are right about a third of the time and their fractions vary."""
    def grade(self, completion, record):
        return Grade(exact=len(completion) % 3 == 0, partial=0.0, formatted=True)


def test_sampled_eval_grades_every_seeded_sample_of_every_record(tiny_model, tokenizer):
    from picorl.data import eval_records, messages_of
    from picorl.rollout import Sampling
    from picorl.session import build_engine

    env = _LengthOfThree()
    records = eval_records(3, 6, env=env)
    engine = build_engine("hf", tiny_model, tokenizer, batch_size=8, progress=False)
    kw = dict(max_tokens=12, engine=engine, env=env, temperature=1.0, seed=7)
    summary, items = evaluate_records(tiny_model, tokenizer, records, samples=3, **kw)
    groups = engine.generate([messages_of(r, env) for r in records], 3,
                             Sampling(temperature=1.0, max_tokens=12, seed=7))
    expect = [sum(len(c.text) % 3 == 0 for c in g) / 3 for g in groups]
    assert [i["sampled"] for i in items] == expect
    assert summary["sampled"] == pytest.approx(sum(expect) / 6)
    assert summary["pass_at_k"] == sum(1 for f in expect if f > 0) / 6
    # the greedy half is what an eval without samples gives, and the samples are seeded
    _, greedy = evaluate_records(tiny_model, tokenizer, records, **kw)
    assert [i["completion"] for i in greedy] == [i["completion"] for i in items]
    _, again = evaluate_records(tiny_model, tokenizer, records, samples=3, **kw)
    assert [i["sampled"] for i in again] == expect
    # an eval leaves torch's generator as it found it: training draws next what it would have
    import torch
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    evaluate_records(tiny_model, tokenizer, records, samples=3, **kw)
    assert torch.equal(torch.rand(3), expected_next)


# ---------------------------------------------------------------- reasoned: right by its own working

def test_letter_counting_reads_whether_an_answer_follows_its_chain():
    env, rec = LetterCounting(), {"string": "banana", "letters": ["a", "n"], "answer": {"a": 3, "n": 2}}
    chain = "<think>b a1 n1 a2 n2 a3</think>\n"
    assert env.follows_working(chain + '<answer>{"a": 3, "n": 2}</answer>', rec) is True
    # an answer that differs from its chain, right or wrong, does not follow it
    assert env.follows_working("<think>b a1 n1 a2 n2 a2</think>\n" + '<answer>{"a": 3, "n": 2}</answer>', rec) is False
    # no closed chain (none written, or a loop cut at max_tokens): no working to follow
    assert env.follows_working('<answer>{"a": 3, "n": 2}</answer>', rec) is False
    assert env.follows_working("<think>b a1 n1 a2 n2 a3 b a4", rec) is False
    # the base interface reads no working: evals then leave `reasoned` out
    from picorl.envs.arithmetic import Arithmetic
    assert Arithmetic().follows_working("<answer>4</answer>", {"difficulty": 1}) is None


def reasoned_item(s, exact, reasoned):
    return {**item(s, exact), "reasoned": reasoned}


def test_reasoned_is_summarised_and_paired_beside_exact():
    # exact rises 1 -> 3 of 4, but reasoned falls 1 -> 0: the new answers ignore their chains
    before = [reasoned_item("a", 1.0, 1.0), reasoned_item("b", 0.0, 0.0), reasoned_item("c", 0.0, 0.0),
              reasoned_item("d", 0.0, 0.0)]
    after = [reasoned_item("a", 1.0, 0.0), reasoned_item("b", 1.0, 0.0), reasoned_item("c", 1.0, 0.0),
             reasoned_item("d", 0.0, 0.0)]
    got = paired_change(before, after)
    assert (got["gained"], got["lost"]) == (2, 0)
    assert got["reasoned"] == {"before": 0.25, "after": 0.0, "gained": 0, "lost": 1, "p_value": 1.0}
    s = summarise([{**i, "partial": i["exact"], "formatted": 1.0} for i in before])
    assert s["reasoned"] == 0.25 and eval_metrics({3: s})["eval/reasoned_d3"] == 0.25
    assert parse_eval_metric("eval/reasoned_d3") == ("reasoned", 3)
    assert item_fields(after)[-1] == "reasoned"
    # only where both evals read working
    assert "reasoned" not in paired_change(before, [item(i["string"], i["exact"]) for i in after])
    assert "reasoned" not in summarise([{**item("a", 1.0), "partial": 1.0, "formatted": 1.0}])
