"""model.lora.base_dtype: the frozen base weights' matmuls on bf16 copies while the adapter trains."""
import pytest
import torch

from picorl import base_matmuls, models
from picorl.config import Config, ConfigError, load_config
from picorl.head_logprobs import selected_logprobs
from picorl.sft import sft_loss

BF16 = torch.bfloat16


def adapted(tokenizer):
    torch.manual_seed(0)
    model = models.add_lora(models.tiny_llama(len(tokenizer)), rank=4, alpha=8)
    with torch.no_grad():  # a trained-looking adapter, so its path carries signal
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_a_base_layer_multiplies_its_bf16_copy_inside_using_and_its_weight_outside(tokenizer):
    model = adapted(tokenizer)
    layers = base_matmuls.frozen_base_layers(model)
    assert len(layers) == 2 * 7  # every adapted projection of the 2 layers
    assert base_matmuls.attach(model) == len(layers) + 1  # and the output head
    layer = layers[0]
    w_low = layer.weight.detach().to(BF16)
    x = torch.randn(5, layer.in_features, requires_grad=True)
    g = torch.randn(5, layer.out_features)
    with base_matmuls.using(model):
        y = layer(x)
    y.backward(g)  # after the block: the matmul saved its copy
    # Exactly the bf16 product, accumulated and handed on in float32 (what AMX computes)
    assert y.dtype == torch.float32 and torch.equal(y, (x.detach().to(BF16) @ w_low.T).float())
    assert torch.equal(x.grad, (g.to(BF16) @ w_low).float())
    assert layer.weight.grad is None  # frozen: no gradient of its own
    outside = layer(x.detach())
    assert torch.equal(outside, torch.nn.functional.linear(x.detach(), layer.weight))


def test_the_chunked_head_with_a_bf16_weight_is_log_softmax_of_the_rounded_logits():
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    w_low = torch.randn(50, 16).to(BF16)
    targets = torch.randint(0, 50, (7,))
    got = selected_logprobs(hidden, w_low, targets, chunk=3)
    g = torch.randn(7)
    got.backward(g)
    grad_got, hidden.grad = hidden.grad, None
    ref = torch.log_softmax((hidden.to(BF16) @ w_low.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    ref.backward(g)
    # Same bf16 logits; the float32 log-sum-exp differs only in summation order.
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # The hidden gradient is a bf16 matmul of float32 rows that agree to float32 rounding, so
    # the two round to bf16 alike but where a row sits on a rounding edge: one bf16 step,
    # at most 2^-7 of the value, is the most a product can move.
    torch.testing.assert_close(grad_got, hidden.grad, rtol=2 ** -7, atol=1e-3)


def test_a_training_loss_uses_the_copies_and_the_model_outside_it_does_not(tokenizer):
    model = adapted(tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 12))
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :6] = -100
    float32_loss = sft_loss(model, ids, attn, labels)
    float32_logits = model(input_ids=ids, attention_mask=attn).logits
    base_matmuls.attach(model)
    low_loss = sft_loss(model, ids, attn, labels)
    assert low_loss != float32_loss  # the copies did the matmuls
    # Each operand keeps 8 significant bits (relative error <= 2^-8); a loss near log(vocab)
    # moves by a small multiple of that, inside 1%.
    assert low_loss.item() == pytest.approx(float32_loss.item(), rel=1e-2)
    low_loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    # An eval's forward (engines, `picorl eval`) sees the float32 weights
    assert torch.equal(model(input_ids=ids, attention_mask=attn).logits, float32_logits)


def test_the_setting_picks_bf16_for_a_float32_model_and_is_refused_for_full_fine_tuning(tokenizer):
    model = models.tiny_llama(len(tokenizer))
    assert models.base_matmul_dtype("model", model) is None
    assert models.base_matmul_dtype("bfloat16", model) is BF16
    assert models.base_matmul_dtype("auto", model) is (BF16 if models.has_bf16_matmul() else None)
    assert models.base_matmul_dtype("bfloat16", model.to(BF16)) is None  # nothing to gain
    with pytest.raises(ConfigError, match="model.lora.base_dtype=bfloat16 keeps bf16 copies .* "
                                          "model.lora.enabled=false"):
        load_config(None, ["model.lora.base_dtype=bfloat16", "model.lora.enabled=false"])
    cfg = Config()
    cfg.model.name, cfg.model.device, cfg.model.lora.base_dtype = models.TINY, "cpu", "bfloat16"
    loaded, _ = models.load_for_config(cfg)
    assert len(loaded._picorl_low_layers) == len(base_matmuls.frozen_base_layers(loaded)) + 1
    with pytest.raises(ValueError, match="need a LoRA adapter"):
        base_matmuls.attach(model)
