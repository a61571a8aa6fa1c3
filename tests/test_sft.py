import statistics

import pytest
import torch

from picorl import data, evaluate, models, sft
from picorl.envs.letter_counting import grade


def test_every_style_parses_to_the_true_answer(tokenizer):
    for d in (1, 2, 5, 6, 9):
        for r in data.train_records(d, 30):
            for style in sft.STYLES:
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
    assert sft.cot_tokens_text(["ban", "ana"], r["letters"]) == "<think>\nban: b a1 n1\nana: a2 n2 a3\n</think>\n"
    with pytest.raises(ValueError, match="pass the tokenizer"):
        sft.demonstration(r, "cot_tokens")
    # Each line's head, as the target itself tokenizes, is the very token id the prompt
    # holds for that piece of the string: copying the next piece is a lookup.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    for rec in data.eval_records(6, 16) + data.eval_records(3, 16):
        prompt = sft.chat_prompt_ids(tokenizer, data.messages_of(rec))
        piece_ids = tokenizer(rec["string"], add_special_tokens=False)["input_ids"]
        assert any(prompt[i:i + len(piece_ids)] == piece_ids for i in range(len(prompt)))
        assert "".join(sft.string_tokens(tokenizer, rec["string"])) == rec["string"]
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


def test_sft_on_tiny_model_reduces_loss_and_is_resumable(tokenizer):
    recs = data.train_records(1, 50)
    model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=8, alpha=16)
    seen = []
    losses = sft.train_sft(model, tokenizer, recs, style="direct", steps=12, batch_size=4, lr=5e-3,
                           on_step=lambda s, l: seen.append(s), progress=False)
    assert seen == list(range(1, 13)) and losses[-1] < losses[0]
    # Step s always sees the same batch: a run resumed at step 6 computes the same first loss.
    m2 = models.add_lora(models.tiny_llama(len(tokenizer)), rank=8, alpha=16)
    again = sft.train_sft(m2, tokenizer, recs, style="direct", steps=1, batch_size=4, lr=5e-3, progress=False)
    assert again[0] == pytest.approx(losses[0])


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
