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
     Without graphs (a CPU) the host looks every step, and rows that stopped leave the
     batch, so a chunk's short completions stop paying for its longest (`_decode_eager`).

Worked example, d6 at k = 8: 16 prompts of ~165 tokens give a 128-row chunk; 16 prompts
are prefilled (not 128), the cache holds 128 rows x S = 640 columns (165 + 384 rounded up
to a multiple of 128), and a completion of 200 tokens costs 200 replays of the 128-row graph.

Weights and the forward pass the step runs: picorl/rollout/decoder.py.

Without CUDA the same step runs eagerly (no graphs); tests/test_graph_engine.py pins it to
the `hf` engine, and tests/test_graph_engine_cuda.py runs the graphs where CUDA exists.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from picorl.batching import chat_prompt_ids, distinct_rows, left_pad_ids, positions
from picorl.rollout.base import Completion, Sampling, stop_ids
from picorl.rollout.decoder import Decoder
from picorl.rollout.sampling import sample_tokens

COLUMN_ROUND = 128  # cache lengths are rounded up to this, so calls of similar lengths share graphs


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def buckets_for(batch_size: int) -> list[int]:
    """Row counts graphs are captured for: powers of two below batch_size, then batch_size."""
    sizes = [1 << i for i in range(batch_size.bit_length()) if (1 << i) < batch_size]
    return sizes + [batch_size]


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
        self.slots = torch.arange(rows, device=dev)  # the chunk row each row holds (moved by compaction)
        self.column = torch.zeros(1, dtype=torch.long, device=dev)  # cache column the next token writes
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # output column the next token fills
        self.all_columns = torch.arange(columns, device=dev)
        self.temperature = torch.ones(1, dtype=torch.float, device=dev)
        self.greedy_rows = torch.zeros(rows, dtype=torch.bool, device=dev)  # rows that take the argmax (mixed calls)
        self.top_p = torch.ones(1, dtype=torch.float, device=dev)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}


class GraphEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = True,
                 use_graphs: bool | None = None, check_every: int = 16, compile_step: bool = False,
                 compact: bool = True, dtype: torch.dtype | None = None):
        self.tokenizer, self.batch_size, self.progress = tokenizer, batch_size, progress
        self.compile_step = compile_step
        self.compact = compact  # eager steps drop rows that stopped (`_decode_eager`)
        self.dec = Decoder(model, dtype)  # dtype None: the model's own
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
        self.row_steps = 0  # rows x decode steps run so far: the work a call did (compaction lowers it)

    def sync_weights(self, model) -> None:
        self.last_sync_bytes = self.dec.sync(model)

    # ---- the decode step

    def _pick(self, logits, greedy: bool, nucleus: bool, st: DecodeState, draws: int | None = None,
              mixed: bool = False):
        """(token, its log-prob under the policy) per row; sampling stays on the device.

        `draws`: how many uniforms the step draws, when its rows are a compacted subset
        (`_decode_eager`): row i takes the uniform of its original row `st.slots[i]`.
        `mixed`: rows flagged in `st.greedy_rows` take the argmax instead of their draw.
        """
        logp = torch.log_softmax(logits, dim=-1)
        if greedy:
            tok = logits.argmax(-1)
        else:
            if draws is None:
                uniform = torch.rand(logits.shape[0], device=logits.device)
            else:
                uniform = torch.rand(draws, device=logits.device)[st.slots[:logits.shape[0]]]
            tok = sample_tokens(logits, st.temperature, st.top_p, uniform, nucleus)
            if mixed:
                tok = torch.where(st.greedy_rows[:logits.shape[0]], logits.argmax(-1), tok)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    def _step_fn(self, st: DecodeState, rows: int, greedy: bool, nucleus: bool, draws: int | None = None,
                 mixed: bool = False):
        """One decode step over the first `rows` rows of `st`, every input read from its buffers."""
        dec = self.dec
        cache = st.cache[:, :, :rows]
        current, positions, pad, done = st.current[:rows], st.positions[:rows], st.pad[:rows], st.done[:rows]
        tokens, logprobs = st.tokens[:rows], st.logprobs[:rows]

        eager = not self.use_graphs and not self.compile_step

        def step():
            # A graph reads all S columns (fixed shapes); eagerly a step reads only the columns
            # written so far. The cache is sized for the longest completion, so in a d3
            # rollout (~150 prompt columns, completions of ~35 of 96 tokens, S = 256) about a
            # third of its columns are still empty, and attention reads every column it gets.
            width = int(st.column) + 1 if eager else st.columns
            columns = st.all_columns[:width]
            visible = (columns >= pad[:, None]) & (columns <= st.column)  # (rows, width)
            hidden = dec.forward(current[:, None], positions[:, None], cache[..., :width, :], st.column,
                                 visible[:, None, None])
            tok, lp = self._pick(dec.logits(hidden[:, -1]), greedy, nucleus, st, draws, mixed)
            tok = torch.where(done, self.pad_id, tok)
            tokens.index_copy_(1, st.step, tok[:, None])
            logprobs.index_copy_(1, st.step, lp[:, None])
            done.logical_or_(torch.isin(tok, self.stops))
            current.copy_(tok)
            positions.add_(1)
            st.column.add_(1)
            st.step.add_(1)
        return step

    def _runner(self, st: DecodeState, rows: int, greedy: bool, nucleus: bool, mixed: bool = False):
        """The step for a bucket: a CUDA graph replay (captured on first use) or the eager step."""
        key = (rows, greedy, nucleus, mixed)
        if self.use_graphs and key in st.graphs:
            return st.graphs[key].replay
        step = self._step_fn(st, rows, greedy, nucleus, mixed=mixed)
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

    def _decode_chunk(self, rows_ids: list[list[int]], owner: list[int], sampling: Sampling,
                      greedy_rows: list[bool] | None = None):
        """Token ids and log-probs of each row (up to max_tokens; stop tokens kept, not cut).

        `greedy_rows`: rows that decode greedily among sampled ones (`generate_with_greedy`).
        """
        dec, dev, n = self.dec, self.dec.device, len(rows_ids)
        greedy = sampling.temperature == 0
        nucleus = not greedy and sampling.top_p < 1.0
        mixed = not greedy and greedy_rows is not None and any(greedy_rows)
        distinct, local = distinct_rows(owner)
        width = max(len(rows_ids[r]) for r in distinct)
        if width + sampling.max_tokens > dec.cos.shape[0]:
            raise ValueError(f"prompt ({width} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                             f"{dec.cos.shape[0]} positions rollout.engine=graph supports for this model")
        st = self._state(width + sampling.max_tokens)
        rows = next(b for b in self.buckets if b >= n)
        run = self._runner(st, rows, greedy, nucleus, mixed)  # captured before the state is filled: capture runs it
        prompt_cache, last_logits = self._prefill([rows_ids[r] for r in distinct])
        index = torch.tensor(local, device=dev)
        for row, prompt in enumerate(local):  # row by row: a gathered copy of them all is a second cache
            st.cache[:, :, row, :, :width].copy_(prompt_cache[:, :, prompt])
        st.cache[:, :, n:rows].zero_()
        lengths = torch.tensor([len(r) for r in rows_ids], device=dev)
        st.pad[:n], st.pad[n:rows] = width - lengths, 0
        st.positions[:n], st.positions[n:rows] = lengths, 0
        st.column.fill_(width)
        st.step.fill_(1)
        st.temperature.fill_(sampling.temperature if not greedy else 1.0)
        st.top_p.fill_(sampling.top_p)
        st.greedy_rows[:rows] = False
        if mixed:
            st.greedy_rows[:n] = torch.tensor(greedy_rows, device=dev)
        tok, lp = self._pick(last_logits[index], greedy, nucleus, st, mixed=mixed)  # each row's first token
        st.tokens[:n, 0], st.logprobs[:n, 0], st.current[:n] = tok, lp, tok
        st.tokens[n:rows, 0], st.current[n:rows] = self.pad_id, self.pad_id
        st.done[:n] = torch.isin(tok, self.stops)
        st.done[n:rows] = True
        if self.compact and not self.use_graphs and not self.compile_step:
            return self._decode_eager(st, n, rows, greedy, nucleus, sampling.max_tokens, mixed)
        steps = 1
        while steps < sampling.max_tokens:
            run()
            steps += 1
            self.row_steps += rows
            if steps % self.check_every == 0 and bool(st.done[:n].all()):  # the only host sync
                break
        return st.tokens[:n, :steps].tolist(), st.logprobs[:n, :steps].tolist()

    def _decode_eager(self, st: DecodeState, n: int, rows: int, greedy: bool, nucleus: bool, max_tokens: int,
                      mixed: bool = False):
        """The decode loop without CUDA graphs: rows that have stopped leave the batch.

        Eagerly a step costs about what its rows cost, and a chunk runs until its longest row
        stops, so the rows that stopped early would keep paying for it. Once a quarter of the
        rows still in the step have stopped, the live ones (cache, tokens, positions) are moved
        to the front and the step runs on them alone. Worked example, a rollout of 32 rows
        whose completions are 20-40 tokens long and one 96: uncompacted, 96 steps x 32 rows =
        3,072 row-steps; compacted, about 30 x 32 + 66 x (a few rows), about half that.
        Each step still draws one uniform per chunk row and a row takes its own, so a seeded
        call samples the same tokens either way (tests/test_graph_engine.py pins it).
        """
        kept: dict[int, tuple[list[int], list[float]]] = {}  # chunk row -> its tokens and log-probs
        st.slots[:rows] = torch.arange(rows, device=st.slots.device)
        active, steps = n, 1
        run = self._step_fn(st, active, greedy, nucleus, draws=rows, mixed=mixed)
        while steps < max_tokens:
            run()
            steps += 1
            self.row_steps += active
            done = st.done[:active]
            stopped = int(done.sum())
            if stopped == active:
                break
            if stopped * 4 >= active:
                live = (~done).nonzero().squeeze(1)
                for i in done.nonzero().squeeze(1).tolist():  # st.slots[i]: the chunk row slot i holds
                    kept[int(st.slots[i])] = (st.tokens[i, :steps].tolist(), st.logprobs[i, :steps].tolist())
                active, columns = len(live), int(st.column)
                # Row by row, in place: live rows are in ascending order and each moves to a slot
                # at or before its own, so no row is overwritten before it has moved. (A gathered
                # copy would allocate and fill a second cache at every compaction.)
                for slot, row in enumerate(live.tolist()):
                    if slot != row:
                        st.cache[:, :, slot, :, :columns].copy_(st.cache[:, :, row, :, :columns])
                for buf in (st.tokens, st.logprobs):
                    buf[:active, :steps] = buf[live, :steps]
                for buf in (st.current, st.positions, st.pad, st.done, st.slots, st.greedy_rows):
                    buf[:active] = buf[live]
                run = self._step_fn(st, active, greedy, nucleus, draws=rows, mixed=mixed)
        for i, r in enumerate(st.slots[:active].tolist()):
            kept[r] = (st.tokens[i, :steps].tolist(), st.logprobs[i, :steps].tolist())
        return [kept[r][0] for r in range(n)], [kept[r][1] for r in range(n)]

    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[Completion]]:
        return self._generate(prompts, n, sampling, greedy_last=False)

    def generate_with_greedy(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[Completion]]:
        """n samples, then the greedy completion, of each prompt (groups of n + 1) in one decode pass.

        The greedy rows ride in the sampled rows' chunks and take the argmax where those draw:
        on 2 cores a chunk's decode step costs about the same for 32 rows as for 40, so the
        greedy answers cost a few rows more instead of a second pass (which doubled a
        rollout: 8.5 -> 15.5 s for 8 d3 tasks x 4 samples).
        """
        return self._generate(prompts, n, sampling, greedy_last=True)

    @torch.no_grad()
    def _generate(self, prompts: list[list[dict]], n: int, sampling: Sampling,
                  greedy_last: bool) -> list[list[Completion]]:
        tok = self.tokenizer
        prompt_ids = [chat_prompt_ids(tok, m) for m in prompts]
        per = n + int(greedy_last)
        flat = [ids for ids in prompt_ids for _ in range(per)]  # row j: member j % per of prompt j // per
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        stops = set(self.stops.tolist())
        order = sorted(range(len(flat)), key=lambda j: len(flat[j]))  # chunks of similar lengths pad little
        results: dict[int, Completion] = {}
        bar = tqdm(total=len(flat), desc="rollout", unit="seq", leave=False, disable=not self.progress)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            token_rows, logp_rows = self._decode_chunk([flat[j] for j in idx], [j // per for j in idx], sampling,
                                                       [greedy_last and j % per == n for j in idx])
            for j, ids, lps in zip(idx, token_rows, logp_rows):
                end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
                ids = ids[:end]
                results[j] = Completion(text=tok.decode(ids, skip_special_tokens=True), token_ids=ids,
                                        prompt_ids=flat[j], logprobs=lps[:end], finished=ids[-1] in stops)
            bar.update(len(idx))
        bar.close()
        ordered = [results[j] for j in range(len(flat))]
        return [ordered[i * per:(i + 1) * per] for i in range(len(prompts))]


def describe_capacity(engine: GraphEngine) -> dict:
    """Buffers and graphs an engine holds now (for benchmarks): cache lengths, graphs, bytes."""
    cache_bytes = sum(s.cache.numel() * s.cache.element_size() for s in engine.states.values())
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in engine.dec.w.values()}.values())
    return {"cache_lengths": sorted(engine.states), "graphs": sum(len(s.graphs) for s in engine.states.values()),
            "cache_gb": cache_bytes / 1e9, "weights_gb": weight_bytes / 1e9, "warmup_s": engine.warmup_s,
            "buckets": engine.buckets}
