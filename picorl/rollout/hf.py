"""Rollouts with transformers' `generate`: the engine that runs anywhere torch runs.

All prompts x n go through `generate` in as few calls as memory allows (`batch_size`
sequences per call), left-padded so every prompt ends where generation starts, sorted by
prompt length so a call pads little. The n samples of a prompt share its keys/values: the
prompt is prefilled once and its cache rows repeated, which at d6 (a ~165-token prompt,
8 samples) takes a quarter off a rollout and changes no token. `generate` stops a call as
soon as every sequence in it has emitted a stop token. The engine shares the trainer's
model object, so there is no weight sync to do.

Two switches trade start-up time for decode speed without changing results:
`cache="static"` preallocates the KV cache for prompt + max_tokens, so every decode step
has the same shapes; `compile=True` then runs the decode step through `torch.compile`
(transformers does this by itself on CUDA with a static cache; `compile=False` turns it
off there). bench/rollout.py measures them side by side.

Sampling is done by `InverseCDFSampler`, not by `generate`'s `torch.multinomial`: the
same distribution, drawn with one uniform number per sequence instead of one random
number per vocabulary entry (see its docstring for what that saves).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from picorl.batching import chat_prompt_ids, distinct_rows, left_pad_ids, positions, repeat_cache_rows
from picorl.rollout.base import Completion, Sampling, stop_ids
from picorl.rollout.sampling import sample_inverse_cdf

CACHES = ("dynamic", "static")


class InverseCDFSampler(LogitsProcessor):
    """Samples the next token itself and gives `generate` a one-hot choice to take greedily.

    `torch.multinomial` draws one exponential random number per vocabulary entry: 3M of
    them per decode step at 64 sequences x SmolLM2's 49k vocabulary, 63 ms on a 2-core CPU.
    Inverting the cumulative distribution needs one uniform per sequence and costs about
    1.5 ms. The tokens follow the same distribution (temperature, then top-p, as `generate`
    would apply them); a given seed draws different ones. `generate` runs with
    do_sample=False, so its argmax picks the sampled token.
    """

    def __init__(self, temperature: float, top_p: float):
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        uniform = torch.rand(scores.shape[0], device=scores.device)
        choice = sample_inverse_cdf(torch.softmax(scores, dim=-1), uniform)
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice, 0.0)


class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = True,
                 cache: str = "dynamic", compile: bool = False):
        if cache not in CACHES:
            raise ValueError(f"rollout.hf_cache must be one of {', '.join(CACHES)}, got {cache!r}")
        if compile and cache != "static":
            raise ValueError("rollout.hf_compile needs rollout.hf_cache=static (a dynamic cache changes "
                             "shape every step, so a compiled step would recompile every step)")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.cache, self.compile = cache, compile

    def _speed_kwargs(self) -> dict:
        if self.cache == "dynamic":
            return {}
        from transformers import CompileConfig

        if not self.compile:
            return {"cache_implementation": "static", "disable_compile": True}
        cc = CompileConfig(fullgraph=False, dynamic=False)
        cc._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
        return {"cache_implementation": "static", "compile_config": cc}

    def _shared_prefill(self, input_ids, attn, owner):
        """Keys/values of all but each prompt's last token, computed once per distinct prompt.

        The k samples of a task share its prompt, so the prompt is run once and its cache
        rows repeated; `generate` then feeds only the last prompt token and decodes.
        """
        rows, local = distinct_rows(owner)
        ids, mask = input_ids[rows, :-1], attn[rows, :-1]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                         logits_to_keep=1)
        return repeat_cache_rows(out.past_key_values, local)

    def sync_weights(self, model) -> None:
        self.model = model  # same object as the trainer's: nothing to copy

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[Completion]]:
        tok, model = self.tokenizer, self.model
        prompt_ids = [chat_prompt_ids(tok, m) for m in prompts]
        # Sequence j of the flat batch is sample (j % n) of prompt (j // n), so groups stay together.
        flat = [ids for ids in prompt_ids for _ in range(n)]
        stops = stop_ids(model, tok)
        greedy = sampling.temperature == 0
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        bar = tqdm(total=len(flat), desc="rollout", unit="seq", leave=False, disable=not self.progress)
        # Long prompts first would waste less padding, but order must map back; sort then restore.
        order = sorted(range(len(flat)), key=lambda j: len(flat[j]))
        results: dict[int, Completion] = {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            input_ids, attn = left_pad_ids([flat[j] for j in idx], tok.pad_token_id)
            width = input_ids.shape[1]
            kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                          max_new_tokens=sampling.max_tokens, eos_token_id=stops,
                          pad_token_id=tok.pad_token_id, **self._speed_kwargs())
            if not greedy:
                kwargs["logits_processor"] = LogitsProcessorList(
                    [InverseCDFSampler(sampling.temperature, sampling.top_p)])
            input_ids, attn = input_ids.to(device), attn.to(device)
            owner = [j // n for j in idx]
            if n > 1 and self.cache == "dynamic" and len(set(owner)) < len(owner):
                kwargs["past_key_values"] = self._shared_prefill(input_ids, attn, owner)
            out = model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
            new = out[:, width:].tolist()
            for r, j in enumerate(idx):
                ids, finished = [], False
                for t in new[r]:
                    ids.append(t)
                    if t in stops:
                        finished = True
                        break
                text = tok.decode(ids, skip_special_tokens=True)
                results[j] = Completion(text=text, token_ids=ids, prompt_ids=flat[j], finished=finished)
            bar.update(len(idx))
        bar.close()
        model.train(was_training)
        ordered = [results[j] for j in range(len(flat))]
        return [ordered[i * n:(i + 1) * n] for i in range(len(prompts))]
