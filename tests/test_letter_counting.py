import collections
import json
import random
import string as _string
import time

import pytest

from picorl.envs.base import EnvError
from picorl.envs.letter_counting import (TIERS, LetterCounting, build_messages, chain_counts, chain_spelling, cot_text,
                                         cot_tokens_text, demonstration, grade, make_task, parse_answer, score,
                                         spelling_reward)


@pytest.mark.parametrize("difficulty", sorted(TIERS))
def test_tasks_follow_their_tier(difficulty):
    lo, hi, p_multi, min_k, max_k, random_string = TIERS[difficulty]
    rng = random.Random(difficulty)
    multi = 0
    for _ in range(300):
        t = make_task(rng, difficulty)
        s, letters = t["string"], t["letters"]
        assert lo <= len(s) <= hi and s.isascii() and s.isalpha() and s.islower()
        assert len(set(letters)) == len(letters)
        if len(letters) > 1:
            multi += 1
            assert min(max(2, min_k), 26) <= len(letters) <= min(max_k, 26)
        # property: every answer is the true count
        assert t["answer"] == {c: s.count(c) for c in letters}
    if p_multi == 0.0:
        assert multi == 0
    elif p_multi == 1.0:
        assert multi == 300
    else:
        assert abs(multi / 300 - p_multi) < 0.12


def test_target_letters_lean_towards_present_letters():
    rng = random.Random(0)
    present = total = 0
    for _ in range(500):
        t = make_task(rng, 6)
        present += sum(c in t["string"] for c in t["letters"])
        total += len(t["letters"])
    # uniform letters would be present ~ 1 - (25/26)^60 ~ 90% at d6; d3 tells bias better
    rng = random.Random(1)
    p3 = [c in t["string"] for t in (make_task(rng, 3) for _ in range(500)) for c in t["letters"]]
    assert 0.55 < sum(p3) / len(p3) < 0.95


def test_uniform_letters_are_drawn_from_the_alphabet_not_the_string():
    rng = random.Random(2)
    tasks = [make_task(rng, 3, letters="uniform") for _ in range(500)]
    present = [c in t["string"] for t in tasks for c in t["letters"]]
    assert sum(present) / len(present) < 0.5  # leaning letters: 0.55-0.95 (above)
    rng = random.Random(3)
    asked = collections.Counter(c for _ in range(2000) for c in make_task(rng, 6, letters="uniform")["letters"])
    expected = sum(asked.values()) / 26
    assert len(asked) == 26 and all(0.85 * expected < v < 1.15 * expected for v in asked.values())


def _kind(text: str, c: str) -> int:
    return min(text.count(c), 2)  # 0 absent, 1 once, 2 more than once


@pytest.mark.parametrize("word,kinds", [("overmodest", 3), ("dog", 2)])
def test_balanced_letters_draw_each_kind_that_exists_equally_often(word, kinds):
    # "overmodest" has all three kinds (e, o twice); "dog" has no repeated letter, so its
    # first asked letter is absent or once with probability 1/2 each.
    from picorl.envs.letter_counting import _balanced_letters
    rng, n = random.Random(4), 3000
    firsts = collections.Counter(_kind(word, _balanced_letters(rng, word, 3)[0]) for _ in range(n))
    assert set(firsts) == set(range(kinds))
    # each count is binomial(n, 1/kinds): 5 standard deviations either side
    sd = (n * (1 / kinds) * (1 - 1 / kinds)) ** 0.5
    assert all(abs(v - n / kinds) < 5 * sd for v in firsts.values()), firsts


def test_balanced_letters_are_distinct_and_stay_within_the_kinds_left():
    from picorl.envs.letter_counting import _balanced_letters
    rng = random.Random(5)
    for _ in range(300):
        asked = _balanced_letters(rng, "overmodest", 12)  # more than the 8 present letters
        assert len(set(asked)) == 12 and all(c.isascii() and c.islower() for c in asked)
        # only 2 letters occur twice and 6 once: asking 12 takes every one of them at most once
        assert sum(_kind("overmodest", c) == 2 for c in asked) <= 2


def test_mixed_letters_leave_no_constant_answer_right():
    from picorl.envs.letter_counting import _mixed_letters
    rng = random.Random(7)
    for word in ("dog", "overmodest", "aaaa", "abcdefghijklmnopqrstuvwxy"):
        for n in (1, 2, 3, 26):
            asked = _mixed_letters(rng, word, n)
            # at least two letters, distinct, with at least two different counts
            assert len(asked) == max(n, 2) == len(set(asked))
            assert len({word.count(c) for c in asked}) > 1, (word, asked)
    # each of the 26 letters once: no draw is mixed, so a balanced one comes back (no endless loop)
    pangram = _string.ascii_lowercase
    assert len(set(_mixed_letters(rng, pangram, 3))) == 3
    env = LetterCounting(train_letters="mixed")
    tasks = [env.make_record(rng, d, "train") for d in (1, 3, 5) for _ in range(200)]
    assert all(len(set(t["answer"].values())) > 1 for t in tasks)


def test_the_train_letters_option_changes_the_train_split_only():
    balanced, leaning = LetterCounting(train_letters="balanced"), LetterCounting()
    for split in ("eval", "fresh"):  # held-out and fresh items are the same whatever a run trains on
        assert [balanced.make_record(random.Random(i), 3, split) for i in range(50)] == \
            [leaning.make_record(random.Random(i), 3, split) for i in range(50)]
    def all_ones(env):
        rng = random.Random(6)
        tasks = [env.make_record(rng, 3, "train") for _ in range(1000)]
        return sum(set(t["answer"].values()) == {1} for t in tasks) / len(tasks)
    # Under "balanced" a d3 task's answer is all ones with probability at most 0.4 x 1/2 + 0.6 x 1/4
    # (one letter asked on 40%, two or three on 60%; a kind is drawn from at least two), 0.35.
    # If a word has all three kinds it is 0.4 x 1/3 + 0.6 x (1/3 x 1/3 or less) = 0.2 or less.
    assert all_ones(balanced) < all_ones(leaning)
    assert all_ones(balanced) < 0.35


def test_a_bad_train_letters_option_is_refused_by_name():
    from picorl.envs import load_env
    with pytest.raises(EnvError, match="train_letters must be one of leaning, balanced, mixed, uniform, got 'even'"):
        load_env("letter_counting", {"train_letters": "even"})
    with pytest.raises(EnvError, match="letter_counting.*colour"):
        load_env("letter_counting", {"colour": "red"})
    with pytest.raises(ValueError, match="letters must be one of"):
        make_task(random.Random(0), 3, letters="even")


def test_prompt_names_string_letters_and_format():
    one = build_messages("banana", ["a"])
    many = build_messages("banana", ["a", "n"])
    assert one[0]["role"] == "system" and "<answer>" in one[0]["content"]
    assert '"banana"' in one[1]["content"] and "'a'" in one[1]["content"] and "integer" in one[1]["content"]
    assert "JSON" in many[1]["content"] and "'n'" in many[1]["content"]


@pytest.mark.parametrize("completion,expected", [
    ("<answer>3</answer>", {"a": 3}),
    ("<answer> 3 \n</answer>", {"a": 3}),
    ("<answer>03</answer>", {"a": 3}),
    ("<think><answer>9</answer></think> so <answer>3</answer>", {"a": 3}),
    ("<answer>1</answer> no wait <answer>3</answer>", {"a": 3}),
    ("<answer>2</answer></think>nothing after", None),
    ("<answer>3", None),
    ("3", None),
    ("<answer></answer>", None),
    ("<answer>-3</answer>", None),
    ("<answer>3.0</answer>", None),
    ("<answer>three</answer>", None),
    ("<answer>\u0663</answer>", None),          # Arabic-Indic digit three
    ("<answer>\uff13</answer>", None),          # fullwidth 3
    ("<answer>" + "9" * 100_000 + "</answer>", {"a": -1}),  # formatted, never right
])
def test_parse_one_letter(completion, expected):
    p = parse_answer(completion, ["a"])
    assert p.counts == expected


@pytest.mark.parametrize("body,ok", [
    ('{"a": 3, "n": 2}', True),
    ('{"n": 2, "a": 3}', True),
    ('{"a": 3}', False),                        # missing key
    ('{"a": 3, "n": 2, "x": 0}', False),        # extra key
    ('{"a": 3, "a": 3, "n": 2}', False),        # duplicate key
    ('{"a": true, "n": 2}', False),             # bool
    ('{"a": 3.0, "n": 2}', False),              # float
    ('{"a": NaN, "n": 2}', False),
    ('{"a": "3", "n": 2}', False),              # string
    ('{"\u0430": 3, "n": 2}', False),           # Cyrillic a look-alike
    ('[3, 2]', False),
    ('{"a": 3, "n": 2', False),
    ('[' * 100_000 + ']' * 100_000, False),     # deep nesting
    ('{"a": ' + '1' * 5000 + ', "n": 2}', False),  # beyond int's max digits
])
def test_parse_several_letters(body, ok):
    p = parse_answer(f"<answer>{body}</answer>", ["a", "n"])
    assert p.formatted is ok


def test_negative_json_count_is_unformatted_as_it_is_alone():
    # A count is never negative: `-3` for one letter is unformatted, and so is -3 inside JSON.
    g = grade('<answer>{"a": -3, "n": 2}</answer>', ["a", "n"], {"a": 3, "n": 2})
    assert g["formatted"] == 0.0 and g["exact"] == 0.0 and g["partial"] == 0.0
    assert not parse_answer("<answer>-3</answer>", ["a"]).formatted


def test_grading_no_letters_is_an_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="the task asks for no letters"):
        grade("<answer>{}</answer>", [], {})


def test_rewards():
    ans1 = {"a": 3}
    assert score("<answer>3</answer>", ["a"], ans1, kind="partial") == 1.0
    assert score("<answer>4</answer>", ["a"], ans1, kind="partial") == pytest.approx(0.1)
    assert score("4", ["a"], ans1, kind="partial") == 0.0
    assert score("<answer>3</answer>", ["a"], ans1, kind="binary") == 1.0
    assert score("<answer>4</answer>", ["a"], ans1, kind="binary") == 0.0
    ans = {"a": 3, "n": 2, "b": 1}
    half = '<answer>{"a": 3, "n": 2, "b": 5}</answer>'
    assert score(half, ["a", "n", "b"], ans, kind="partial") == pytest.approx(0.1 + 0.9 * 2 / 3)
    assert score(half, ["a", "n", "b"], ans, kind="binary") == 0.0
    assert score(half, ["a", "n", "b"], ans, kind="binary", format_bonus=0.2) == pytest.approx(0.2)
    assert score("junk", ["a", "n", "b"], ans, kind="binary", format_bonus=0.2) == 0.0
    with pytest.raises(ValueError, match="'bogus'"):
        score(half, ["a", "n", "b"], ans, kind="bogus")


def test_grade_reports_exact_partial_formatted():
    ans = {"a": 3, "n": 2}
    assert grade('<answer>{"a": 3, "n": 2}</answer>', ["a", "n"], ans) == \
        {"exact": 1.0, "partial": 1.0, "formatted": 1.0, "prediction": {"a": 3, "n": 2}}
    assert grade("no tags", ["a", "n"], ans)["formatted"] == 0.0


@pytest.mark.parametrize("junk", [
    "x" * 1_000_000,
    "<answer>" * 200_000,
    "</answer>" * 200_000,
    "<answer>" + "{" * 500_000 + "</answer>",
    "<answer>" + json.dumps({"a": "x" * 1_000_000, "n": 1}) + "</answer>",
    "</think>" * 100_000 + "<answer>1</answer>",
])
def test_hostile_completions_are_fast_and_never_raise(junk):
    for letters in (["a"], ["a", "n"]):
        t0 = time.perf_counter()
        g = grade(junk, letters, {c: 1 for c in letters})
        s = score(junk, letters, {c: 1 for c in letters}, kind="partial")
        assert time.perf_counter() - t0 < 1.0
        assert 0.0 <= s <= 1.0 and g["exact"] in (0.0, 1.0)


def test_non_string_completion_scores_zero():
    assert score(None, ["a"], {"a": 1}) == 0.0


def test_chain_counts_read_the_last_running_tag_of_each_asked_letter():
    chain = "<think>o1 v e1 r m o2 d e2 s t</think>\n<answer>{\"e\": 1, \"o\": 2}</answer>"
    assert chain_counts(chain, ["e", "o", "x"]) == {"e": 2, "o": 2, "x": 0}
    # tags of letters not asked are not counts of the asked ones; the answer tag is not read
    assert chain_counts("<think>a1 b1 a2</think><answer>7</answer>", ["b"]) == {"b": 1}
    # no chain, or one that never closes (a loop cut at max_tokens): nothing was counted
    assert chain_counts("<answer>{\"e\": 2}</answer>", ["e"]) is None
    assert chain_counts("<think>o1 v e1 r m o2 d e2 s t o3 v e3", ["e"]) is None
    assert chain_counts(None, ["e"]) is None
    assert chain_counts("<think>e" + "9" * 5000 + "</think>", ["e"]) == {"e": 0}  # not a tag: never an int of 5000 digits


@pytest.mark.parametrize("letters", ["leaning", "mixed"])
def test_every_demonstration_chain_counts_the_true_answer(letters):
    """The chains SFT teaches end on the true count of every asked letter, in both chain styles:
    so a chain whose tally is wrong misspelt or miscounted, and an answer that differs from a
    right chain did not say what was counted."""
    rng = random.Random(3)
    for difficulty in (1, 3, 5):
        for _ in range(100):
            t = make_task(rng, difficulty, letters)
            assert chain_counts(cot_text(t["string"], t["letters"]), t["letters"]) == t["answer"]
            pieces = [t["string"][i:i + 3] for i in range(0, len(t["string"]), 3)]  # any cut into tokens
            assert chain_counts(cot_tokens_text(pieces, t["letters"]), t["letters"]) == t["answer"]
            full = demonstration({**t}, "cot")
            assert chain_counts(full, t["letters"]) == parse_answer(full, t["letters"]).counts == t["answer"]


def test_chain_spelling_reads_one_letter_a_step():
    assert chain_spelling("<think>o1 v e1 r m o2 d e2 s t</think><answer>2</answer>") == "overmodest"
    # a step that is not one letter (a word written whole, a stray token) is not a letter spelt
    assert chain_spelling("<think>o1 v ermodest</think>") == "ov?"
    assert chain_spelling("<think>o1 v e1 r") is None and chain_spelling(None) is None


def test_spelling_reward_pays_the_answer_and_the_spelling_half_each():
    """The worked example of the docstring, and its edges: a right answer after a right chain
    is 1; an unformatted answer is 0 however well spelt; a right answer with no chain is 0.5."""
    r = {"string": "moon", "letters": ["o"], "answer": {"o": 2}}
    assert spelling_reward("<think>m o1 o2 n</think>\n<answer>2</answer>", r) == 1.0
    # "mon" against "moon": difflib's ratio 2 x 3 matched / 7 characters = 6/7
    assert spelling_reward("<think>m o1 n</think><answer>1</answer>", r) == pytest.approx(0.5 * 6 / 7)
    assert spelling_reward("<think>m o1 n</think><answer>2</answer>", r) == pytest.approx(0.5 + 0.5 * 6 / 7)
    assert spelling_reward("<think>m o1 o2 n</think>", r) == 0.0
    assert spelling_reward("<answer>2</answer>", r) == 0.5
    assert spelling_reward("<think>moon</think><answer>2</answer>", r) == 0.5  # the word whole: "?" spells nothing
    # every demonstration earns the most there is
    rng = random.Random(5)
    for _ in range(100):
        t = make_task(rng, 3)
        assert spelling_reward(demonstration(t, "cot"), t) == 1.0
