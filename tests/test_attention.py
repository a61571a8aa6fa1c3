"""grouped_sdpa gives transformers' sdpa results without repeating key/value heads."""
import pytest
import torch

import picorl.attention  # noqa: F401  (registers grouped_sdpa)
from picorl import data
from picorl.models import load_model, tiny_llama
from picorl.rollout import Sampling
from picorl.rollout.hf import HFEngine


def padded_batch():
    ids = torch.tensor([[2, 2, 2, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [2, 2, 2, 2, 2, 16, 17]])
    return ids, (ids != 2).long()


def run(model, impl, ids, attn):
    model.set_attn_implementation(impl)
    model.zero_grad()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    (logits[attn.bool()].float().logsumexp(-1).sum()).backward()  # only real positions
    return logits[attn.bool()].detach(), [p.grad.clone() for p in model.parameters()]


def test_grouped_sdpa_matches_sdpa_forward_and_backward(tokenizer):
    model = tiny_llama(len(tokenizer), initializer_range=0.3)  # 4 query heads share 2 key/value heads
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    ids, attn = padded_batch()
    want, want_g = run(model, "sdpa", ids, attn)
    got, got_g = run(model, "grouped_sdpa", ids, attn)
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(got_g, want_g):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7


def test_grouped_sdpa_decodes_the_same_tokens(tokenizer):
    model = tiny_llama(len(tokenizer), initializer_range=0.3).eval()
    prompts = [r["messages"] for r in data.train_records(3, 4)]
    out = {}
    for impl in ("sdpa", "grouped_sdpa"):
        model.set_attn_implementation(impl)
        groups = HFEngine(model, tokenizer, progress=False).generate(prompts, 2, Sampling(temperature=1.0, max_tokens=8, seed=5))
        out[impl] = [c.token_ids for g in groups for c in g]
    assert out["sdpa"] == out["grouped_sdpa"]


def test_load_model_uses_grouped_sdpa_and_checks_the_name():
    model, _ = load_model("tiny-random-llama")
    assert model.config._attn_implementation == "grouped_sdpa"
    with pytest.raises(ValueError, match="model.attention must be one of grouped_sdpa, sdpa, eager, got 'flash'"):
        load_model("tiny-random-llama", attention="flash")


@pytest.fixture
def cudnn_sdp_flag():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_only_a_cuda_model_turns_cudnn_attention_off(cudnn_sdp_flag):
    torch.backends.cuda.enable_cudnn_sdp(True)
    load_model("tiny-random-llama", device="cpu")
    assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU run leaves the process's settings alone
    if torch.cuda.is_available():
        load_model("tiny-random-llama", device="cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["grouped_sdpa", "sdpa"])
def test_bf16_gradients_stay_finite_on_fully_masked_pad_rows(impl, cudnn_sdp_flag):
    """A left-padded bf16 batch 192 tokens long (192 % 128 == 64, the shape of the cuDNN bug):
    the pads' query rows see no key, and every gradient must still be finite."""
    from picorl.sft import sft_loss
    model, _ = load_model("tiny-random-llama", device="cuda", dtype="bfloat16", attention=impl)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (4, 192), generator=g)
    attn = torch.ones_like(ids)
    for row, pads in enumerate([0, 5, 40, 100]):
        attn[row, :pads] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :150] = -100
    sft_loss(model, ids.cuda(), attn.cuda(), labels.cuda()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
