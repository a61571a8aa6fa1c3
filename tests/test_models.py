import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from picorl import models


def test_tiny_llama_builds_and_runs(tokenizer):
    model = models.tiny_llama(len(tokenizer))
    ids = tokenizer(["hello"], return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tokenizer_pads_left_with_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_lora_wraps_all_projections_and_trains_only_the_adapter(tiny_model):
    peft_model = models.add_lora(tiny_model, rank=4, alpha=8)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_A" in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def adapted_layers(model) -> set[int]:
    """The decoder layers whose parameters train (an adapter's)."""
    return {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}


def test_lora_on_the_top_layers_only_leaves_the_layers_below_without_gradients(tokenizer):
    model = models.add_lora(models.tiny_llama(len(tokenizer), num_hidden_layers=3), rank=4, alpha=8, top_layers=2)
    assert adapted_layers(model) == {1, 2}
    for module in model.modules():  # B starts at zero: give the adapters an effect to backpropagate
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(input_ids=ids, output_hidden_states=True)
    out.logits.sum().backward()
    # hidden_states: the embeddings (into layer 0), layer 0's output (into layer 1), layer 1's,
    # and the normed last: autograd records nothing below layer 1, so the backward stops there
    assert [h.requires_grad for h in out.hidden_states] == [False, False, True, True]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="between 1 and the model's 3 layers, got 4"):
        models.add_lora(models.tiny_llama(len(tokenizer), num_hidden_layers=3), top_layers=4)


def test_lora_names_missing_targets(tiny_model):
    with pytest.raises(ValueError, match=r"\['c_attn'\] not found"):
        models.add_lora(tiny_model, target_modules=["q_proj", "c_attn"])


def test_a_lora_rank_above_a_targets_smallest_side_is_refused_before_loading():
    from picorl.config import Config
    cfg = Config()
    cfg.model.name = models.TINY
    # tiny_llama: hidden 64, 2 key/value heads of 16, so k_proj and v_proj are 64 x 32
    for rank in (4, 32):
        cfg.model.lora.rank = rank
        models.check_model(cfg.model)
    cfg.model.lora.rank = 33
    with pytest.raises(models.BadModelError, match=r"model.lora.rank=33 is above (k|v)_proj's smallest side in "
                                                     r"tiny-random-llama \(32\).*use model.lora.rank <= 32"):
        models.check_model(cfg.model)
    cfg.model.lora.target_modules = ["q_proj", "gate_proj"]  # only the 64-wide ones: 33 fits
    models.check_model(cfg.model)
    shape, _, depth = models.model_shape(models.TINY)
    assert shape["k_proj"] == 32 and shape["q_proj"] == 64 and shape["gate_proj"] == 64
    assert depth == models.tiny_llama(64).config.num_hidden_layers


def test_lora_top_layers_is_checked_against_the_depth_and_reaches_the_adapter():
    from picorl.config import Config
    cfg = Config()
    cfg.model.name, cfg.model.device = models.TINY, "cpu"
    depth = models.tiny_llama(64).config.num_hidden_layers
    cfg.model.lora.top_layers = depth + 1
    with pytest.raises(models.BadModelError, match=rf"model.lora.top_layers={depth + 1} is more layers than "
                                                    rf"tiny-random-llama's {depth}; use 1 to {depth}"):
        models.check_model(cfg.model)
    cfg.model.lora.top_layers = 1
    models.check_model(cfg.model)
    model, _ = models.load_for_config(cfg)
    assert adapted_layers(model) == {depth - 1}
    cfg.model.lora.top_layers = 0  # every layer
    model, _ = models.load_for_config(cfg)
    assert adapted_layers(model) == set(range(depth))


def test_missing_model_says_what_and_where(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="'no-such/model' not found.*local Hugging Face cache"):
        models.resolve_model("no-such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelNotFoundError, match="has no config.json"):
        models.resolve_model(str(tmp_path / "empty"))


def test_missing_adapter_is_named(tiny_model, tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="adapter_config.json not found"):
        models.load_adapter(tiny_model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(models.ModelNotFoundError, match="pickled .bin adapters are not loaded"):
        models.load_adapter(tiny_model, tmp_path)


def test_local_folder_loads_from_safetensors(tokenizer, tmp_path):
    m = models.tiny_llama(len(tokenizer))
    m.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = models.load_model(str(tmp_path), device="cpu")
    assert not any(p.name.endswith(".bin") for p in tmp_path.iterdir())
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(loaded(ids).logits, m.eval()(ids).logits)


@pytest.mark.slow
def test_embedded_model_loads_and_chats():
    model, tok = models.load_model(models.EMBEDDED, device="cpu")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(135e6, rel=0.05)
    assert "quantization_config" not in json.loads((models.embedded_model_dir() / "config.json").read_text())
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def _convert(cache, q):
    import os
    os.environ["PICORL_CACHE"] = cache
    from picorl import models as m
    q.put(str(m.embedded_model_dir()))


@pytest.mark.slow
def test_concurrent_conversion_leaves_one_whole_model(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_convert, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    dirs = {q.get(timeout=5), q.get(timeout=5)}
    assert len(dirs) == 1
    leftovers = [p.name for p in (tmp_path / "models").iterdir()]
    assert leftovers == [models.EMBEDDED]
    assert (tmp_path / "models" / models.EMBEDDED / "model.safetensors").is_file()


def test_seed_config_lora_targets_fit_a_tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from picorl.config import load_config
    cfg = load_config("configs/seed_qwen3_4b.yaml")
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    lora = cfg.model.lora
    peft_model = models.add_lora(qwen, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules)
    wrapped = {n.split(".")[-4] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert wrapped == set(lora.target_modules) and (lora.rank, lora.alpha) == (32, 64)
    assert peft_model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)


def test_a_new_adapter_is_a_function_of_the_run_seed():
    from picorl.config import load_config
    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")

    def initial_adapter(seed, rng_state):
        torch.manual_seed(rng_state)  # whatever ran before left the global RNG anywhere
        model, _ = models.load_for_config(load_config(smoke, [f"run.seed={seed}"]))
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])

    first = initial_adapter(0, rng_state=1)
    assert first.abs().sum() > 0
    assert torch.equal(first, initial_adapter(0, rng_state=2))
    assert not torch.equal(first, initial_adapter(1, rng_state=1))
