"""Rollouts with our own decode step over a static KV cache, replayed as CUDA graphs on a GPU.

Why: a decode step of SmolLM2-135M reads about 270 MB of weights, about 0.1 ms of an H100's
bandwidth, but costs 92-102 ms through transformers' `generate`: some 450 small kernels
launched one by one from Python, and host round trips every step. A CUDA graph records the
step's kernels once and launches them all at once, so a step costs what the GPU needs.

How one call runs (`generate`):
  1. The prompts x n rows are sorted by prompt length and cut into chunks of `batch_size`
     rows; a chunk's rows are padded up to a bucket size (1, 2, 4, ... batch_size) so a
     few captured graphs serve every chunk. Spare rows start finished.
  2. Each distinct prompt of a chunk is run once (the prefill); its keys/values are copied
     into the rows of its k samples in a static cache, [rows, kv heads, S, head dim] per
     layer. Prompts are left-padded to the chunk's width W, so every row writes its next
     token at the same column t = W, W+1, ... while its position is its own prompt length
     + steps.
  3. The decode step feeds one token per row, samples the next on the device, writes it to
     an output buffer and updates the stop flags. All of its state (t, positions, the
     current tokens, the stop flags) lives in device buffers the step updates itself, so N
     steps are N graph replays; the host looks at the stop flags every `check_every` steps.

Worked example, d6 at k = 8: 16 prompts of ~165 tokens give a 128-row chunk; 16 prompts
are prefilled (not 128), the cache holds 128 rows x S = 640 columns (165 + 384 rounded up
to a multiple of 128), and a completion of 200 tokens costs 200 replays of the 128-row graph.

Weights: the engine keeps its own copy, with q/k/v fused into one matrix and gate/up into
another (fewer kernels per layer). A LoRA adapter stays an adapter inside the step (x A^T,
then that times B^T scaled by alpha/r), not merged into the weights: merged into bf16 base
weights, an early update of 1e-3 of a weight's size falls below half a bf16 step (2^-9 to
2^-8 of the weight) and rounds away, and the engine would sample from a stale policy. `sync_weights`
copies only what trains (the adapter, or every weight under full fine-tuning) into the
same buffers, so captured graphs stay valid.

Without CUDA the same step runs eagerly (no graphs); tests/test_graph_engine.py pins it to
the `hf` engine, and tests/test_graph_engine_cuda.py runs the graphs where CUDA exists.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from picorl.batching import chat_prompt_ids, distinct_rows, left_pad_ids, positions
from picorl.rollout.base import Completion, Sampling, stop_ids
from picorl.rollout.sampling import sample_tokens

SUPPORTED = ("llama", "qwen2", "qwen3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLUMN_ROUND = 128  # cache lengths are rounded up to this, so calls of similar lengths share graphs
MAX_TABLE = 32768  # longest prompt + completion the rotary table covers


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def buckets_for(batch_size: int) -> list[int]:
    """Row counts graphs are captured for: powers of two below batch_size, then batch_size."""
    sizes = [1 << i for i in range(batch_size.bit_length()) if (1 << i) < batch_size]
    return sizes + [batch_size]


# ---------------------------------------------------------------- the weights the step reads


def _base(model):
    """The transformers causal LM inside a (possibly PEFT-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_names(module) -> list[str]:
    """Active, unmerged LoRA adapters of a module (none when adapters are off)."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    names = [n for n in module.active_adapters if n in module.lora_A]
    if any(getattr(module, "use_dora", {}).get(n) for n in names):
        raise ValueError("rollout.engine=graph does not run DoRA adapters; use rollout.engine=hf")
    return names


def _linear_weight(module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight


def _linear_bias(module):
    return getattr(getattr(module, "base_layer", module), "bias", None)


@dataclass
class Spec:
    """One engine buffer: how to build it from the model, and whether training changes it."""
    build: callable
    trainable: bool


def _fused_specs(prefix: str, mods: list) -> dict[str, Spec]:
    """Specs of a fused linear over `mods` (outputs concatenated): weight, bias, LoRA A and B.

    Every active adapter of every module becomes rows of one A (R x in) and a block of one
    B (out x R) holding B x scaling, so x A^T B^T adds each module's update to its own
    output slice and nothing to the others.
    """
    specs = {f"{prefix}.weight": Spec(lambda: torch.cat([_linear_weight(m) for m in mods]),
                                      any(_linear_weight(m).requires_grad for m in mods))}
    if any(_linear_bias(m) is not None for m in mods):
        def bias():
            return torch.cat([_linear_bias(m) if _linear_bias(m) is not None
                              else torch.zeros(_linear_weight(m).shape[0], dtype=_linear_weight(m).dtype,
                                               device=_linear_weight(m).device) for m in mods])
        specs[f"{prefix}.bias"] = Spec(bias, any(_linear_bias(m) is not None and _linear_bias(m).requires_grad
                                                 for m in mods))
    parts = [(m, n) for m in mods for n in _lora_names(m)]
    if parts:
        def lora_a():
            return torch.cat([m.lora_A[n].weight for m, n in parts])

        first_row, rows = {}, 0  # where each module's output slice starts in the fused output
        for m in mods:
            first_row[id(m)], rows = rows, rows + _linear_weight(m).shape[0]

        def lora_b():
            ref = parts[0][0].lora_B[parts[0][1]].weight
            out = torch.zeros(rows, sum(m.lora_A[n].weight.shape[0] for m, n in parts), dtype=ref.dtype, device=ref.device)
            col = 0
            for m, n in parts:
                b, r = m.lora_B[n].weight, first_row[id(m)]
                out[r:r + b.shape[0], col:col + b.shape[1]] = b * m.scaling[n]
                col += b.shape[1]
            return out
        trains = any(m.lora_A[n].weight.requires_grad or m.lora_B[n].weight.requires_grad for m, n in parts)
        specs[f"{prefix}.lora_a"] = Spec(lora_a, trains)
        specs[f"{prefix}.lora_b"] = Spec(lora_b, trains)
    return specs


def weight_specs(model) -> dict[str, Spec]:
    """Every tensor the decode step reads, by name, built from the model's current weights."""
    lm = _base(model)
    cfg = lm.config
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"rollout.engine=graph runs {', '.join(SUPPORTED)} models, not {cfg.model_type!r}; "
                         "use rollout.engine=hf")
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError("rollout.engine=graph needs full attention and a SiLU MLP; use rollout.engine=hf")
    for name, mod in lm.named_modules():
        if _lora_names(mod) and name.rsplit(".", 1)[-1] not in PROJECTIONS:
            raise ValueError(f"rollout.engine=graph runs LoRA on {', '.join(PROJECTIONS)} only, not on {name}")

    def param(t):
        return Spec(lambda: t, t.requires_grad)

    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    specs = {"embed": param(emb), "norm": param(lm.model.norm.weight)}
    if head is not emb:
        specs["lm_head"] = param(head)
    for i, layer in enumerate(lm.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        specs[f"{i}.input_norm"] = param(layer.input_layernorm.weight)
        specs[f"{i}.post_norm"] = param(layer.post_attention_layernorm.weight)
        if hasattr(a, "q_norm"):  # qwen3 normalises each head's queries and keys before rotary
            specs[f"{i}.q_norm"], specs[f"{i}.k_norm"] = param(a.q_norm.weight), param(a.k_norm.weight)
        specs.update(_fused_specs(f"{i}.qkv", [a.q_proj, a.k_proj, a.v_proj]))
        specs.update(_fused_specs(f"{i}.o", [a.o_proj]))
        specs.update(_fused_specs(f"{i}.gate_up", [mlp.gate_proj, mlp.up_proj]))
        specs.update(_fused_specs(f"{i}.down", [mlp.down_proj]))
    return specs


# ---------------------------------------------------------------- the forward pass


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm, operation for operation (float32 inside, then the weight)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Decoder:
    """The model's forward over engine-owned weights, writing keys/values into a given cache."""

    def __init__(self, model):
        specs = weight_specs(model)  # first: it names an unsupported model before its config is read
        lm = _base(model)
        cfg = lm.config
        self.layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.vocab = cfg.vocab_size
        ref = lm.get_input_embeddings().weight
        self.dtype, self.device = ref.dtype, ref.device
        # One dtype for every buffer: PEFT keeps adapter weights in float32 beside a bf16 base,
        # and a matmul of bf16 activations with a float32 matrix is an error. sync() copies
        # into these buffers, so later updates are cast the same way.
        self.w = {name: spec.build().detach().to(self.dtype, copy=True) for name, spec in specs.items()}
        if "lm_head" not in self.w:
            self.w["lm_head"] = self.w["embed"]  # tied: one buffer serves both
        # The rotary tables for every position a call can reach, computed once by the model's
        # own rotary module (so scaled variants such as llama3's come out right).
        positions = min(getattr(cfg, "max_position_embeddings", MAX_TABLE) or MAX_TABLE, MAX_TABLE)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = lm.model.rotary_emb(probe, torch.arange(positions, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # (positions, head_dim)

    @torch.no_grad()
    def sync(self, model) -> int:
        """Copy what training changes into the engine's buffers; returns the bytes copied."""
        copied = 0
        for name, spec in weight_specs(model).items():
            if spec.trainable:
                src = spec.build()
                if src.shape != self.w[name].shape:
                    raise ValueError(f"rollout.engine=graph: {name} changed shape {tuple(self.w[name].shape)} -> "
                                     f"{tuple(src.shape)}; build a new engine for a new model")
                self.w[name].copy_(src)
                copied += src.numel() * src.element_size()
        return copied

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))
        a = self.w.get(f"{name}.lora_a")
        return y if a is None else y + F.linear(F.linear(x, a), self.w[f"{name}.lora_b"])

    def attention(self, q, k_cache, v_cache, mask):
        """Grouped-query attention over the whole cache without repeating its heads.

        q: (B, heads, L, d); caches (B, kv_heads, S, d); mask (B, 1, L, S) boolean. The g
        query heads of a key/value head are stacked along the query axis (as
        picorl/attention.py does), so one SDPA call per key/value head reads the cache as is.
        """
        b, h, length, d = q.shape
        g = h // self.kv_heads
        q = q.reshape(b, self.kv_heads, g * length, d)
        if length > 1:
            mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, 1, g * length, mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=self.scale)
        return out.reshape(b, h, length, d).transpose(1, 2).reshape(b, length, h * d)

    def forward(self, ids, positions, caches, write_cols, mask) -> torch.Tensor:
        """Final hidden states of `ids` (B, L) at `positions` (B, L).

        Writes each layer's new keys/values into cache columns `write_cols` (L,) of
        caches = (keys, values), each (layers, B, kv_heads, S, d); attends over all S
        columns where `mask` (B, 1, L, S) is true.
        """
        w, (b, length) = self.w, ids.shape
        x = F.embedding(ids, w["embed"])
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, L, d)
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        for i in range(self.layers):
            h = rms_norm(x, w[f"{i}.input_norm"], self.eps)
            q, k, v = self.linear(f"{i}.qkv", h).split(sizes, dim=-1)
            q = q.view(b, length, self.heads, self.head_dim)
            k = k.view(b, length, self.kv_heads, self.head_dim)
            if f"{i}.q_norm" in w:
                q, k = rms_norm(q, w[f"{i}.q_norm"], self.eps), rms_norm(k, w[f"{i}.k_norm"], self.eps)
            q = rotate(q.transpose(1, 2), cos, sin)
            k = rotate(k.transpose(1, 2), cos, sin)
            v = v.view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
            caches[0][i].index_copy_(2, write_cols, k)
            caches[1][i].index_copy_(2, write_cols, v)
            x = x + self.linear(f"{i}.o", self.attention(q, caches[0][i], caches[1][i], mask))
            gate, up = self.linear(f"{i}.gate_up", rms_norm(x, w[f"{i}.post_norm"], self.eps)).chunk(2, dim=-1)
            x = x + self.linear(f"{i}.down", F.silu(gate) * up)
        return rms_norm(x, w["norm"], self.eps)

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_last, self.w["lm_head"]).float()

    def new_cache(self, rows: int, columns: int) -> torch.Tensor:
        return torch.zeros(2, self.layers, rows, self.kv_heads, columns, self.head_dim,
                           dtype=self.dtype, device=self.device)


# ---------------------------------------------------------------- decode state and the step


class DecodeState:
    """Device buffers of one cache length S for up to `rows` rows; graphs use leading slices."""

    def __init__(self, dec: Decoder, rows: int, columns: int):
        dev = dec.device
        self.columns = columns
        self.cache = dec.new_cache(rows, columns)
        self.tokens = torch.zeros(rows, columns, dtype=torch.long, device=dev)  # sampled tokens, by step
        self.logprobs = torch.zeros(rows, columns, dtype=torch.float, device=dev)
        self.current = torch.zeros(rows, dtype=torch.long, device=dev)  # the token each row feeds next
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pad = torch.zeros(rows, dtype=torch.long, device=dev)  # first real cache column of each row
        self.done = torch.ones(rows, dtype=torch.bool, device=dev)
        self.column = torch.zeros(1, dtype=torch.long, device=dev)  # cache column the next token writes
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # output column the next token fills
        self.all_columns = torch.arange(columns, device=dev)
        self.temperature = torch.ones(1, dtype=torch.float, device=dev)
        self.top_p = torch.ones(1, dtype=torch.float, device=dev)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}


class GraphEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = True,
                 use_graphs: bool | None = None, check_every: int = 16, compile_step: bool = False):
        self.tokenizer, self.batch_size, self.progress = tokenizer, batch_size, progress
        self.compile_step = compile_step
        self.dec = Decoder(model)
        self.use_graphs = self.dec.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.dec.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.buckets = buckets_for(batch_size)
        self.check_every = check_every
        self.stops = torch.tensor(stop_ids(model, tokenizer), device=self.dec.device)
        self.pad_id = tokenizer.pad_token_id
        self.states: dict[int, DecodeState] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.warmup_s = 0.0  # seconds spent capturing graphs so far
        self.last_sync_bytes = 0

    def sync_weights(self, model) -> None:
        self.last_sync_bytes = self.dec.sync(model)

    # ---- the decode step

    def _pick(self, logits, greedy: bool, nucleus: bool, st: DecodeState):
        """(token, its log-prob under the policy) per row; sampling stays on the device."""
        logp = torch.log_softmax(logits, dim=-1)
        if greedy:
            tok = logits.argmax(-1)
        else:
            uniform = torch.rand(logits.shape[0], device=logits.device)
            tok = sample_tokens(logits, st.temperature, st.top_p, uniform, nucleus)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    def _step_fn(self, st: DecodeState, rows: int, greedy: bool, nucleus: bool):
        """One decode step over the first `rows` rows of `st`, every input read from its buffers."""
        dec = self.dec
        cache = st.cache[:, :, :rows]
        current, positions, pad, done = st.current[:rows], st.positions[:rows], st.pad[:rows], st.done[:rows]
        tokens, logprobs = st.tokens[:rows], st.logprobs[:rows]

        def step():
            visible = (st.all_columns >= pad[:, None]) & (st.all_columns <= st.column)  # (rows, S)
            hidden = dec.forward(current[:, None], positions[:, None], cache, st.column, visible[:, None, None])
            tok, lp = self._pick(dec.logits(hidden[:, -1]), greedy, nucleus, st)
            tok = torch.where(done, self.pad_id, tok)
            tokens.index_copy_(1, st.step, tok[:, None])
            logprobs.index_copy_(1, st.step, lp[:, None])
            done.logical_or_(torch.isin(tok, self.stops))
            current.copy_(tok)
            positions.add_(1)
            st.column.add_(1)
            st.step.add_(1)
        return step

    def _runner(self, st: DecodeState, rows: int, greedy: bool, nucleus: bool):
        """The step for a bucket: a CUDA graph replay (captured on first use) or the eager step."""
        key = (rows, greedy, nucleus)
        if self.use_graphs and key in st.graphs:
            return st.graphs[key].replay
        step = self._step_fn(st, rows, greedy, nucleus)
        if self.compile_step:
            # Inductor fuses the step's elementwise work (norms, rotary, the adapter's adds:
            # about 50 kernels a layer) into a few kernels, and the graph then replays those.
            # Row counts are symbolic, so the buckets share one compile; its random numbers
            # come from Inductor's own generator, so a seed samples differently than eagerly.
            step = torch.compile(step, fullgraph=True, dynamic=True)
        if not self.use_graphs:
            return step
        if key not in st.graphs:
            t0 = time.perf_counter()
            # Capture draws random numbers (warm-up steps, the captured step); put the
            # generator back so a seeded call samples the same whether or not it captured.
            rng = torch.cuda.get_rng_state(self.dec.device)
            for counter in (st.column, st.step, st.positions):  # warm-up steps must stay inside the buffers
                counter.zero_()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up runs: kernels pick their workspaces before capture
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                step()
            torch.cuda.synchronize()
            torch.cuda.set_rng_state(rng, self.dec.device)
            st.graphs[key] = graph
            self.warmup_s += time.perf_counter() - t0
        return st.graphs[key].replay

    def _state(self, columns: int) -> DecodeState:
        """The decode state with at least `columns` cache columns.

        One state serves every call that fits in it (unused columns stay masked), so training
        and evals share one cache and one set of graphs; a longer call replaces it. At d6 in
        configs/gpu.yaml that cache is 512 rows x 640 columns x 30 layers x 2 x 3 heads x 64
        x 2 bytes = 7.5 GB.
        """
        fits = [c for c in self.states if c >= columns]
        if fits:
            return self.states[min(fits)]
        self.states.clear()  # frees the shorter cache and its graphs before the longer one is made
        columns = _round_up(columns, COLUMN_ROUND)
        self.states[columns] = DecodeState(self.dec, self.buckets[-1], columns)
        return self.states[columns]

    # ---- one chunk of rows

    def _prefill(self, prompts: list[list[int]]):
        """(keys/values (2, layers, n, kv, W, d), last-position logits (n, V)) of distinct prompts."""
        dec, dev = self.dec, self.dec.device
        ids, real = (t.to(dev) for t in left_pad_ids(prompts, self.pad_id))
        width, real = ids.shape[1], real.bool()
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        # A pad position sees only itself: a row with nothing to attend to would give NaN, and
        # a NaN key/value poisons every later sum it enters, masked or not.
        mask = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)
        cache = dec.new_cache(len(prompts), width)
        hidden = dec.forward(ids, positions(real), cache, torch.arange(width, device=dev), mask[:, None])
        return cache, dec.logits(hidden[:, -1])

    def _decode_chunk(self, rows_ids: list[list[int]], owner: list[int], sampling: Sampling):
        """Token ids and log-probs of each row (up to max_tokens; stop tokens kept, not cut)."""
        dec, dev, n = self.dec, self.dec.device, len(rows_ids)
        greedy = sampling.temperature == 0
        nucleus = not greedy and sampling.top_p < 1.0
        distinct, local = distinct_rows(owner)
        width = max(len(rows_ids[r]) for r in distinct)
        if width + sampling.max_tokens > dec.cos.shape[0]:
            raise ValueError(f"prompt ({width} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                             f"{dec.cos.shape[0]} positions rollout.engine=graph supports for this model")
        st = self._state(width + sampling.max_tokens)
        rows = next(b for b in self.buckets if b >= n)
        run = self._runner(st, rows, greedy, nucleus)  # captured before the state is filled: capture runs it
        prompt_cache, last_logits = self._prefill([rows_ids[r] for r in distinct])
        index = torch.tensor(local, device=dev)
        st.cache[:, :, :n, :, :width].copy_(prompt_cache[:, :, index])
        st.cache[:, :, n:rows].zero_()
        lengths = torch.tensor([len(r) for r in rows_ids], device=dev)
        st.pad[:n], st.pad[n:rows] = width - lengths, 0
        st.positions[:n], st.positions[n:rows] = lengths, 0
        st.column.fill_(width)
        st.step.fill_(1)
        st.temperature.fill_(sampling.temperature if not greedy else 1.0)
        st.top_p.fill_(sampling.top_p)
        tok, lp = self._pick(last_logits[index], greedy, nucleus, st)  # each row's first token
        st.tokens[:n, 0], st.logprobs[:n, 0], st.current[:n] = tok, lp, tok
        st.tokens[n:rows, 0], st.current[n:rows] = self.pad_id, self.pad_id
        st.done[:n] = torch.isin(tok, self.stops)
        st.done[n:rows] = True
        steps = 1
        while steps < sampling.max_tokens:
            run()
            steps += 1
            if steps % self.check_every == 0 and bool(st.done[:n].all()):  # the only host sync
                break
        return st.tokens[:n, :steps].tolist(), st.logprobs[:n, :steps].tolist()

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[Completion]]:
        tok = self.tokenizer
        prompt_ids = [chat_prompt_ids(tok, m) for m in prompts]
        flat = [ids for ids in prompt_ids for _ in range(n)]  # row j: sample j % n of prompt j // n
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        stops = set(self.stops.tolist())
        order = sorted(range(len(flat)), key=lambda j: len(flat[j]))  # chunks of similar lengths pad little
        results: dict[int, Completion] = {}
        bar = tqdm(total=len(flat), desc="rollout", unit="seq", leave=False, disable=not self.progress)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            token_rows, logp_rows = self._decode_chunk([flat[j] for j in idx], [j // n for j in idx], sampling)
            for j, ids, lps in zip(idx, token_rows, logp_rows):
                end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
                ids = ids[:end]
                results[j] = Completion(text=tok.decode(ids, skip_special_tokens=True), token_ids=ids,
                                        prompt_ids=flat[j], logprobs=lps[:end], finished=ids[-1] in stops)
            bar.update(len(idx))
        bar.close()
        ordered = [results[j] for j in range(len(flat))]
        return [ordered[i * n:(i + 1) * n] for i in range(len(prompts))]


def describe_capacity(engine: GraphEngine) -> dict:
    """Buffers and graphs an engine holds now (for benchmarks): cache lengths, graphs, bytes."""
    cache_bytes = sum(s.cache.numel() * s.cache.element_size() for s in engine.states.values())
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in engine.dec.w.values()}.values())
    return {"cache_lengths": sorted(engine.states), "graphs": sum(len(s.graphs) for s in engine.states.values()),
            "cache_gb": cache_bytes / 1e9, "weights_gb": weight_bytes / 1e9, "warmup_s": engine.warmup_s,
            "buckets": engine.buckets}
