"""Streams a kdship store into packed training batches: shards in the background, never the whole store.

Order (deterministic from ``seed``): each epoch permutes the shards, takes them ``shuffle_shards`` at a
time (a *group*), and permutes the group's samples together, so samples mix across shards while only
one group (plus the next, being decoded by worker threads) is in memory. A global batch is the next
samples in that order until their tokens would pass ``batch_tokens``; under DDP every rank builds the
same global batch and takes its share (longest first, to the rank with the fewest tokens), so N
processes see exactly the samples one process would. Each rank packs its samples into rows
(first-fit decreasing, row length = its longest sample) with position ids restarting at every sample;
transformers turns restarting position ids into a block-diagonal causal mask (no cross-sample
attention).

Held-out slice: a sample is held out when the first 4 bytes of its content hash, read as a fraction of
2**32, fall below ``heldout_fraction``: stable across re-sharding, never trained on, and the first
``eval_samples`` of them (in store order) are the evaluation set.

Resuming: every batch carries ``state`` = where the next batch starts (epoch, group, index in the
group's order); ``StoreLoader(..., state=that)`` continues from there exactly.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from kdship.heldout import DEFAULT_HELDOUT_FRACTION, heldout_mask
from kdship.store import StoreReader, dequantize_hidden


@dataclass
class Rows:
    """The trained rows of one rank's batch, flattened: N rows."""

    topk_ids: torch.Tensor  # [N, K] int64, -1 = no id
    topk_logprobs: torch.Tensor  # [N, K] float32, -inf with id -1
    target_weights: torch.Tensor | None  # [N, K] float32 (sampled stores) or None
    targets: torch.Tensor  # [N] int64, the data token of each row
    row_weight: torch.Tensor  # [N] float32, averaging weights; they sum to 1 over the global batch
    target_drawn: torch.Tensor | None = None  # [N, K] bool with target_weights: the entry is a draw (not exact)
    hint_targets: torch.Tensor | None = None  # [N, L, D] float32, the teacher's projected hidden states (hint KD)
    # False where the data tokens are the student's own samples (an on-policy round store): the loss
    # then teaches through the teacher's targets only, with no CE on them
    ce_on_data: bool = True

    def to(self, device) -> "Rows":
        return Rows(**{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    def pin_memory(self) -> "Rows":
        return Rows(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, C] int64
    position_ids: torch.Tensor  # [R, C] int64, restarting at 0 for every packed sample
    pred_index: torch.Tensor  # [N] int64, flat index into R*C of the position predicting each row
    rows: Rows
    tokens: int  # real input tokens on this rank
    global_tokens: int  # real input tokens in the global batch (all ranks)
    global_rows: int
    epoch: int
    state: dict[str, int] = field(default_factory=dict)  # where the next batch starts
    source: str | None = None  # MixedLoader: the name of the store the batch came from

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so the trainer's ``.to(cuda, non_blocking=True)`` really is asynchronous."""
        self.input_ids, self.position_ids, self.pred_index = self.input_ids.pin_memory(), self.position_ids.pin_memory(), self.pred_index.pin_memory()
        self.rows = self.rows.pin_memory()
        return self


@dataclass
class _Sample:
    """One sample: positions [start, start + n_input + 1) of shard ``src``; ``rows`` = its trained
    rows relative to ``start`` (loss_mask, never row 0)."""

    src: Any  # the decoded kdship.store.Shard it lives in
    start: int
    n_input: int  # input tokens: the last token is only ever a target
    rows: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        return self.src.tokens[self.start : self.start + self.n_input + 1]


def _samples_of(shard, keep: np.ndarray) -> list[_Sample]:
    """The kept samples of a shard. Trained rows are found for the whole shard at once: per-sample
    numpy calls cost more than the decode itself on short samples."""
    off = np.asarray(shard.offsets, dtype=np.int64)
    trained = np.asarray(shard.loss_mask, dtype=bool).copy()
    trained[off[:-1][off[:-1] < len(trained)]] = False  # row 0 of every sample has no target
    flat = np.flatnonzero(trained)
    cut = np.searchsorted(flat, off).tolist()
    starts = off.tolist()
    return [_Sample(shard, starts[i], starts[i + 1] - starts[i] - 1, flat[cut[i] : cut[i + 1]] - starts[i]) for i in np.flatnonzero(keep).tolist()]


def collate(samples: list[_Sample], global_rows: int, global_samples: int, average: str, global_tokens: int, epoch: int = 0,
            with_drawn: bool = False, exact_only: bool = False) -> Batch:
    """Pack one rank's samples into rows and gather their trained rows' targets.

    The per-sample loop only places input tokens; the targets are gathered with one fancy index per
    source shard (a batch draws from a handful of shards), which matters on short samples.
    ``exact_only``: from a store without the draws' teacher logprobs (``Shard.teacher_logprob_known``),
    its exact entries only, unweighted: the held-out KL then lumps the rest into one category (a lower
    bound of the full KL), where an estimate through the draws would be off by a student-independent
    constant (their logprob slot holds log w, not log p)."""
    if average not in ("token", "sequence"):
        raise ValueError(f"--average {average!r}: choose token or sequence")
    K = samples[0].src.topk_ids.shape[1] if samples else 1
    order = sorted(range(len(samples)), key=lambda i: -samples[i].n_input)
    cap = max((s.n_input for s in samples), default=1)
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in order:  # first-fit decreasing
        n = samples[i].n_input
        for b in range(len(bins)):
            if fill[b] + n <= cap:
                bins[b].append(i)
                fill[b] += n
                break
        else:
            bins.append([i])
            fill.append(n)
    R = max(1, len(bins))
    input_ids = np.zeros((R, cap), dtype=np.int64)
    position_ids = np.zeros((R, cap), dtype=np.int64)
    arange = np.arange(cap)
    placed: list[_Sample] = []
    base: list[int] = []  # flat index in [R * cap] of each placed sample's first input token
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            s = samples[i]
            n = s.n_input
            input_ids[r, at : at + n] = s.src.tokens[s.start : s.start + n]
            position_ids[r, at : at + n] = arange[:n]
            placed.append(s)
            base.append(r * cap + at)
            at += n
        if at < cap:  # padding: its own segment (positions restart), never a target
            position_ids[r, at:] = arange[: cap - at]
    counts = np.asarray([len(s.rows) for s in placed], dtype=np.int64)
    rel = np.concatenate([s.rows for s in placed]) if placed else np.zeros(0, np.int64)
    pred = np.repeat(np.asarray(base, dtype=np.int64) - 1, counts) + rel  # row j is predicted at position j - 1
    absolute = np.repeat(np.asarray([s.start for s in placed], dtype=np.int64), counts) + rel
    src_of = np.repeat(np.asarray([id(s.src) for s in placed], dtype=np.int64), counts)
    N = len(rel)
    ids = np.empty((N, K), np.int32)
    lps = np.empty((N, K), np.float32)
    tg = np.empty(N, np.int32)
    masked = {id(s.src) for s in placed if exact_only and s.src.teacher_logprob_known is not None}
    has_tw = any(s.src.target_weights is not None and id(s.src) not in masked for s in placed)
    tws = np.zeros((N, K), np.float32) if has_tw else None
    drawn = np.zeros((N, K), bool) if has_tw and with_drawn else None  # only the cv estimator reads it
    # hint KD: only when the loader decoded the hidden arrays (StoreLoader(with_hidden=True))
    hid_shape = placed[0].src.hidden_states.shape[1:] if placed and placed[0].src.hidden_states is not None else None
    hint = np.empty((N,) + hid_shape, np.float32) if hid_shape else None
    for src in {id(s.src): s.src for s in placed}.values():
        m = src_of == id(src)
        at_src = absolute[m]
        ids[m] = src.topk_ids[at_src]
        lps[m] = src.topk_logprobs[at_src]
        tg[m] = src.tokens[at_src]
        if id(src) in masked:
            known = src.teacher_logprob_known[at_src]
            ids[m] = np.where(known, ids[m], -1)
            lps[m] = np.where(known, lps[m], -np.inf)
        elif has_tw and src.target_weights is not None:
            tws[m] = src.target_weights[at_src]
            if drawn is not None:  # a sampled store has no exact entries: every entry is a draw
                drawn[m] = src.target_drawn[at_src] if src.target_drawn is not None else True
        if hint is not None:
            hint[m] = dequantize_hidden(src.hidden_states[at_src], src.hidden_scales[at_src])
    per_sample = np.full(len(counts), 1.0 / global_rows) if average == "token" else 1.0 / (np.maximum(counts, 1) * global_samples)
    rows = Rows(
        topk_ids=torch.from_numpy(ids.astype(np.int64)),
        topk_logprobs=torch.from_numpy(lps),
        target_weights=torch.from_numpy(tws) if has_tw else None,
        target_drawn=torch.from_numpy(drawn) if drawn is not None else None,
        targets=torch.from_numpy(tg.astype(np.int64)),
        row_weight=torch.from_numpy(np.repeat(per_sample, counts).astype(np.float32)),
        hint_targets=torch.from_numpy(hint) if hint is not None else None,
    )
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        pred_index=torch.from_numpy(pred.astype(np.int64)),
        rows=rows,
        tokens=int(sum(s.n_input for s in samples)),
        global_tokens=global_tokens,
        global_rows=global_rows,
        epoch=epoch,
    )


def split_for_ranks(samples: list[_Sample], world_size: int) -> list[list[_Sample]]:
    """Longest first to the rank with the fewest tokens so far (ties: lowest rank); deterministic."""
    parts: list[list[_Sample]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(samples)), key=lambda i: (-samples[i].n_input, i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        parts[r].append(samples[i])
        load[r] += samples[i].n_input
    return parts


class StoreLoader:
    """Iterate packed batches from a store; ``max_epochs=None`` cycles forever.

    ``state`` (from ``Batch.state``) resumes exactly; ``workers`` threads decode shards ahead.
    """

    def __init__(
        self,
        store: str,
        batch_tokens: int,
        seed: int = 0,
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
        eval_samples: int = 64,
        shuffle_shards: int = 4,
        workers: int = 2,
        average: str = "token",
        rank: int = 0,
        world_size: int = 1,
        max_epochs: int | None = None,
        state: dict[str, int] | None = None,
        verify: bool = True,
        prefetch_batches: int = 4,
        with_hidden: bool = False,
        with_drawn: bool = False,
        pin_memory: bool = False,
    ):
        # with_hidden: also decode the teacher's hidden states (hint KD); off, they are never read.
        # with_drawn: batches mark which weighted entries are draws (Rows.target_drawn, for the cv estimator)
        # pin_memory: the batch thread page-locks each batch (CUDA: host -> device copies overlap the step)
        self.with_drawn = with_drawn
        self.pin_memory = bool(pin_memory)
        # the loader's own work, in thread CPU seconds (kdship.train.profile: its rate vs the step's)
        self.decode_cpu_s, self.decoded_positions, self.collate_cpu_s, self.collated_tokens = 0.0, 0, 0.0, 0
        self._stats_lock = threading.Lock()
        self.reader = StoreReader(store, verify=verify, with_hidden=with_hidden)
        self.paths = self.reader.shard_paths
        if not self.paths:
            raise ValueError(f"{store}: the store has no committed shards; run `kdship cache` first")
        self.batch_tokens = int(batch_tokens)
        if self.batch_tokens < 2:
            raise ValueError(f"--batch-tokens must be >= 2, got {batch_tokens}")
        self.seed = int(seed)
        self.heldout_fraction = float(heldout_fraction)
        self.eval_samples = int(eval_samples)
        self.shuffle_shards = max(1, int(shuffle_shards))
        self.workers = max(1, int(workers))
        self.average = average
        self.rank, self.world_size = int(rank), int(world_size)
        self.max_epochs = max_epochs
        self.state = dict(state or {"epoch": 0, "group": 0, "index": 0})
        self.prefetch_batches = prefetch_batches
        # shards decode on `workers` threads; a separate thread assembles the next group from them
        # (one pool for both would deadlock when the group task holds the only worker)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kdship-decode")
        self._group_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdship-group")
        self._producers: list[tuple[threading.Event, threading.Thread]] = []  # batch threads, joined by close()
        self.skipped_empty = 0

    # -- order ---------------------------------------------------------------------------------------
    def _groups(self, epoch: int) -> list[list[str]]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        order = [self.paths[i] for i in perm]
        return [order[i : i + self.shuffle_shards] for i in range(0, len(order), self.shuffle_shards)]

    def _read_shard(self, path: str):
        c0 = time.thread_time()
        shard = self.reader.read_shard(path)
        with self._stats_lock:
            self.decode_cpu_s += time.thread_time() - c0
            self.decoded_positions += shard.num_positions
        return shard

    def _decode_group(self, paths: list[str], epoch: int, group: int) -> list[_Sample]:
        c0 = time.thread_time()  # this thread's own work (waiting for the pool costs none)
        samples: list[_Sample] = []
        for shard in self._pool.map(self._read_shard, paths):
            keep = ~heldout_mask(shard.sample_hash, self.heldout_fraction)
            for s in _samples_of(shard, keep):
                if len(s.rows):
                    samples.append(s)
                else:
                    self.skipped_empty += 1
        perm = np.random.default_rng([self.seed, epoch, group, 1]).permutation(len(samples))
        out = [samples[i] for i in perm]
        with self._stats_lock:
            self.decode_cpu_s += time.thread_time() - c0
        return out

    def _sample_stream(self) -> Iterator[tuple[_Sample, dict[str, int]]]:
        """(sample, position of the sample *after* it) in training order, from ``self.state``."""
        epoch, group, index = self.state["epoch"], self.state["group"], self.state["index"]
        while self.max_epochs is None or epoch < self.max_epochs:
            groups = self._groups(epoch)
            nxt = self._group_pool.submit(self._decode_group, groups[group], epoch, group) if group < len(groups) else None
            while group < len(groups):
                samples = nxt.result()
                following = (epoch, group + 1) if group + 1 < len(groups) else (epoch + 1, 0)
                if following[0] == epoch or self.max_epochs is None or following[0] < self.max_epochs:
                    fg = self._groups(following[0])
                    nxt = self._group_pool.submit(self._decode_group, fg[following[1]], following[0], following[1])
                for i in range(index, len(samples)):
                    after = {"epoch": epoch, "group": group, "index": i + 1}
                    if i + 1 == len(samples):
                        after = {"epoch": following[0], "group": following[1], "index": 0}
                    after["sample_epoch"] = epoch
                    yield samples[i], after
                group, index = group + 1, 0
            epoch, group, index = epoch + 1, 0, 0

    def _batches(self) -> Iterator[Batch]:
        pending: list[tuple[_Sample, dict[str, int]]] = []
        tokens = 0
        for s, after in self._sample_stream():
            if pending and tokens + s.n_input > self.batch_tokens:
                yield self._make_batch(pending)
                pending, tokens = [], 0
            pending.append((s, after))
            tokens += s.n_input
            if tokens >= self.batch_tokens:
                yield self._make_batch(pending)
                pending, tokens = [], 0
        if pending:
            yield self._make_batch(pending)

    def _make_batch(self, pending) -> Batch:
        c0 = time.thread_time()
        samples = [p[0] for p in pending]
        g_rows = sum(len(s.rows) for s in samples)
        g_tokens = sum(s.n_input for s in samples)
        mine = split_for_ranks(samples, self.world_size)[self.rank]
        batch = collate(mine, g_rows, len(samples), self.average, g_tokens, epoch=pending[0][1]["sample_epoch"], with_drawn=self.with_drawn)
        batch.state = {k: v for k, v in pending[-1][1].items() if k != "sample_epoch"}
        if self.pin_memory:
            batch.pin_memory()
        self.collate_cpu_s += time.thread_time() - c0
        self.collated_tokens += g_tokens
        return batch

    def __iter__(self) -> Iterator[Batch]:
        """Batches produced by a background thread (collation overlaps the training step)."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        end = object()

        def put(item) -> bool:
            """Hand ``item`` to the consumer; False once it has stopped (never block on a full queue then)."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for b in self._batches():
                    if not put(b):
                        return
                put(end)
            except BaseException as e:  # surface decode errors (e.g. a failed checksum) in the trainer
                put(e)

        t = threading.Thread(target=produce, name="kdship-batches", daemon=True)
        self._producers.append((stop, t))
        t.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.state = dict(item.state)
                yield item
        finally:
            stop.set()

    def count_batches(self) -> int:
        """Batches in ``max_epochs`` epochs from the start, reading only offsets, masks and hashes."""
        if self.max_epochs is None:
            raise ValueError("count_batches needs max_epochs")
        lengths_of: dict[str, list[int]] = {}

        def lengths(path: str) -> list[int]:
            if path not in lengths_of:
                g = self.reader.root[path]
                off = np.asarray(g["offsets"][...])
                mask = np.asarray(g["loss_mask"][...])
                held = heldout_mask(np.asarray(g["sample_hash"][...]), self.heldout_fraction)
                out = []
                for i in range(len(off) - 1):
                    a, b = int(off[i]), int(off[i + 1])
                    if not held[i] and mask[a + 1 : b].any():
                        out.append(b - a - 1)
                lengths_of[path] = out
            return lengths_of[path]

        n, tokens, pending = 0, 0, False
        for epoch in range(self.max_epochs):
            for group, paths in enumerate(self._groups(epoch)):
                ls = [x for p in paths for x in lengths(p)]
                perm = np.random.default_rng([self.seed, epoch, group, 1]).permutation(len(ls))
                for i in perm:
                    x = ls[i]
                    if pending and tokens + x > self.batch_tokens:
                        n, tokens, pending = n + 1, 0, False
                    tokens, pending = tokens + x, True
                    if tokens >= self.batch_tokens:
                        n, tokens, pending = n + 1, 0, False
        return n + int(pending)

    # -- evaluation ----------------------------------------------------------------------------------
    def heldout_samples(self) -> list[_Sample]:
        """The first ``eval_samples`` held-out samples in store order (reads only hashes to find them)."""
        out: list[_Sample] = []
        for p in self.paths:
            if len(out) >= self.eval_samples:
                break
            hashes = np.asarray(self.reader.root[p]["sample_hash"][...])
            held = heldout_mask(hashes, self.heldout_fraction)
            if not held.any():
                continue
            shard = self.reader.read_shard(p)
            out.extend(s for s in _samples_of(shard, held) if len(s.rows))
        return out[: self.eval_samples]

    def eval_batches(self, batch_tokens: int | None = None) -> list[Batch]:
        """The held-out samples as batches (whole, on every rank; per-token averaging); from a store without
        the draws' logprobs, their exact entries only (``collate``'s ``exact_only``)."""
        samples = self.heldout_samples()
        bt = batch_tokens or self.batch_tokens
        out, cur, n = [], [], 0
        total_rows = sum(len(s.rows) for s in samples)
        for s in samples:
            if cur and n + s.n_input > bt:
                out.append(cur)
                cur, n = [], 0
            cur.append(s)
            n += s.n_input
        if cur:
            out.append(cur)
        return [collate(c, total_rows, len(samples), "token", sum(s.n_input for s in c), with_drawn=self.with_drawn, exact_only=True) for c in out]

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def close(self, timeout: float = 120.0) -> None:
        """Stop the batch threads and wait for them: a consumer that stops early (--stop-after, an
        on-policy phase) leaves one mid-collation, and a thread still inside torch's C++ while the
        interpreter exits aborts the process ("terminate called without an active exception")."""
        for stop, _ in self._producers:
            stop.set()
        for _, t in self._producers:
            t.join(timeout)
        self._producers = [(stop, t) for stop, t in self._producers if t.is_alive()]
        self._group_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


class MixedLoader:
    """Batches drawn from several stores: each batch comes whole from one store, picked by a seeded coin.

    ``stores`` = [(name, StoreLoader, weight)]; the first is the main store (its held-out slice is the
    evaluation set). Batch n's store is drawn from ``default_rng([seed, n, MIX_STREAM])`` with
    probabilities proportional to the weights, so the choice depends only on the seed and the batch's
    number, and a resumed run (``state`` from ``Batch.state``) draws exactly what the uninterrupted
    one would. Whole batches from one store keep ``collate`` unchanged (stores may differ in width k).
    A store not named in ``state`` (e.g. a round store added since) starts from its beginning.
    """

    MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from the shuffles' streams

    def __init__(self, stores: list[tuple[str, "StoreLoader", float]], seed: int, state: dict[str, Any] | None = None):
        if not stores:
            raise ValueError("MixedLoader needs at least one store")
        weights = np.asarray([float(w) for _, _, w in stores], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.names = [n for n, _, _ in stores]
        self.loaders = {n: ld for n, ld, _ in stores}
        self.probs = weights / weights.sum()
        self.seed = int(seed)
        state = dict(state or {})
        if "stores" not in state:  # a plain StoreLoader state (a run that trained on the main store only)
            state = {"n": 0, "stores": {self.names[0]: state} if state else {}}
        self.n = int(state["n"])
        for name, st in state["stores"].items():
            if name in self.loaders and st:
                self.loaders[name].state = dict(st)
        self.batches_by_source = {n: 0 for n in self.names}

    @property
    def skipped_empty(self) -> int:
        return sum(ld.skipped_empty for ld in self.loaders.values())

    def source_of(self, n: int) -> str:
        u = np.random.default_rng([self.seed, n, self.MIX_STREAM]).random()
        return self.names[min(int(np.searchsorted(np.cumsum(self.probs), u, side="right")), len(self.names) - 1)]

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "stores": {n: dict(ld.state) for n, ld in self.loaders.items()}}

    def __iter__(self) -> Iterator[Batch]:
        iters: dict[str, Iterator[Batch]] = {}
        while True:
            name = self.source_of(self.n)
            if name not in iters:
                iters[name] = iter(self.loaders[name])
            try:
                batch = next(iters[name])
            except StopIteration:
                return
            self.n += 1
            self.batches_by_source[name] += 1
            batch.source = name
            batch.state = self.state_dict()
            yield batch

    def eval_batches(self, batch_tokens: int | None = None) -> list[Batch]:
        return self.loaders[self.names[0]].eval_batches(batch_tokens)

    def close(self) -> None:
        for ld in self.loaders.values():
            ld.close()
