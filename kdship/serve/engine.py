"""Continuous batching over an ONNX decoder with a KV cache (the engine behind ``kdship serve --backend onnx``).

One scheduler thread owns the model. Requests wait in a bounded queue; at every decode step the
scheduler admits waiting requests into the running batch (iteration-level "continuous" batching):

1. **Prefill** the newly admitted prompts together (left-padded to the longest, their own forward
   pass with an empty past) and sample each one's first token (that is the time to first token).
2. **Merge** their KV cache into the running batch's: both are left-padded with zero keys/values
   (attention mask 0) to a common past length and concatenated on the batch axis.
3. **Decode** one token for every running sequence in one forward pass:
   ``input_ids [B,1]``, ``position_ids [B,1]`` (each sequence's own position, so left padding does
   not shift positions), ``attention_mask [B, T+1]``.
4. **Retire** finished sequences (EOS, stop string, ``max_tokens``, client gone) and cut mask
   columns that no remaining sequence uses, so the past does not grow with departed long prompts.

Padding only ever sits on the left of a row, the layout the export verifies against PyTorch.
The model is anything with the ``kdship.runtime.onnx.OnnxCausalLM`` interface:
``.tokenizer``, ``.new_past(batch)`` and ``.forward(input_ids, attention_mask, position_ids, past)``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# the ONNX engine's batch and queue sizes: stated here once, used by the app, the server and the CLI help
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 256

import numpy as np

from kdship.serve.detok import IncrementalDetokenizer

log = logging.getLogger("kdship.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already (the HTTP layer answers 429)."""


class EngineStopped(Exception):
    """The engine is draining or stopped and takes no new requests (the HTTP layer answers 503)."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Event:
    """What the scheduler tells a request's consumer.

    kind ``"token"``: ``text`` is the newly final text (may be empty while a possible stop string or an
    incomplete UTF-8 character is held back), ``token_id`` the sampled token.
    kind ``"done"``: ``text`` is the remaining text, ``finish_reason`` "stop" | "length" | "cancelled".
    kind ``"error"``: ``message`` says why the request failed, for the server log: it may hold
    internal detail (exception text), so the HTTP layer does not show it to clients.
    """

    kind: str
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    message: str | None = None


class GenerationRequest:
    """One prompt to complete; ``emit`` is called from the scheduler thread with each :class:`Event`."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None]):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        # Filled by the scheduler.
        self.generated: list[int] = []
        self.detok: IncrementalDetokenizer | None = None
        self.unsent = ""  # decoded text held back: it may still be the start of a stop string
        self.rng = np.random.default_rng(params.seed)
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        """The client went away: the scheduler drops the sequence at its next step."""
        self.cancelled = True


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token from ``logits [V]``: argmax at temperature 0, else nucleus sampling.

    p = softmax(logits / T); keep the smallest set of most likely tokens whose mass >= top_p;
    renormalise and draw with the request's own generator (``seed`` makes it reproducible).
    """
    if params.temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, params.top_p) + 1)
        idx = order[:keep]
        q = p[idx] / p[idx].sum()
        return int(idx[rng.choice(len(idx), p=q)])
    return int(rng.choice(len(p), p=p))


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that may still grow into a stop string.

    (Incomplete UTF-8 characters never get here: the detokenizer holds them back itself.)"""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in ``text``, or None.

    Searching only the unsent text is enough: :func:`_held_back` keeps any text that could begin a
    stop string unsent, so no stop string can start in text already sent."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class BatchStats:
    """Hooks the metrics layer sets; called from the scheduler thread (defaults do nothing)."""

    def decode_step(self, batch_size: int, seconds: float) -> None: ...
    def prefill(self, batch_size: int, tokens: int, seconds: float) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def queue(self, waiting: int, running: int) -> None: ...
    def finished(self, prompt_tokens: int, completion_tokens: int, reason: str) -> None: ...


class ContinuousBatchingEngine:
    """Scheduler thread + bounded queue over one model (see the module docstring for the algorithm).

    ``max_batch``: most sequences decoded together (1 = one request at a time).
    ``max_queue``: most requests waiting for a slot; beyond that :meth:`submit` raises :class:`QueueFull`.
    ``max_prefill_tokens``: bound on padded prompt tokens prefilled in one forward pass.
    Only the scheduler thread uses ``model.tokenizer`` (to detokenise); whoever tokenises prompts
    uses a tokenizer of its own, so a long prompt never waits for, or holds up, a decode step.
    """

    def __init__(
        self,
        model: Any,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_prefill_tokens: int = 4096,
        eos_token_ids: list[int] | None = None,
        stats: BatchStats | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        if eos_token_ids is None:
            eos_token_ids = list(getattr(model, "eos_token_ids", None) or [])
            if not eos_token_ids and self.tokenizer.eos_token_id is not None:
                eos_token_ids = [int(self.tokenizer.eos_token_id)]
        self.eos_token_ids = set(int(t) for t in eos_token_ids)
        pad = getattr(model, "pad_token_id", None)
        if pad is None:
            pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0))
        self.stats = stats or BatchStats()

        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._stop_now = False
        self._thread: threading.Thread | None = None

        # Running batch: requests[i] owns row i of past / mask.
        self._running: list[GenerationRequest] = []
        self._past: list[np.ndarray] | None = None
        self._mask: np.ndarray | None = None  # [B, T] int64
        self._seq_axis = self._find_seq_axis()
        self.steps = 0

    # ---------------------------------------------------------------- public API
    def start(self) -> "ContinuousBatchingEngine":
        self._thread = threading.Thread(target=self._loop, name="kdship-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: GenerationRequest) -> None:
        with self._cv:
            if not self._accepting:
                raise EngineStopped("server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"queue full: {len(self._waiting)} requests waiting (max_queue={self.max_queue})")
            self._waiting.append(req)
            self.stats.queue(len(self._waiting), len(self._running))
            self._cv.notify()

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish the queued and running ones first."""
        with self._cv:
            self._accepting = False
            if not drain:
                self._stop_now = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------- scheduler
    def _find_seq_axis(self) -> int:
        empty = self.model.new_past(1)
        axes = [i for i, n in enumerate(empty[0].shape) if n == 0]
        if len(axes) != 1:
            raise ValueError(f"cannot tell the sequence axis of the empty past, shape {empty[0].shape}")
        return axes[0]

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running and self._accepting and not self._stop_now:
                    self._cv.wait()
                if self._stop_now or (not self._accepting and not self._waiting and not self._running):
                    break
                admitted = self._take_admissible()
                self.stats.queue(len(self._waiting), len(self._running) + len(admitted))
            try:
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._decode_step()
            except Exception as e:  # one failing step must not kill the server: fail its requests
                log.exception("engine step failed")
                for r in self._running + admitted:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.emit(Event("error", message=f"engine step failed: {type(e).__name__}: {e}"))
                self._running, self._past, self._mask = [], None, None
                self.stats.queue(len(self._waiting), 0)
        for r in list(self._running) + list(self._waiting):
            r.emit(Event("error", message="server stopped"))

    def _take_admissible(self) -> list[GenerationRequest]:
        out: list[GenerationRequest] = []
        longest = 0
        while self._waiting and len(self._running) + len(out) < self.max_batch:
            r = self._waiting[0]
            if r.cancelled:
                self._mark_cancelled(self._waiting.popleft())
                continue
            longest_next = max(longest, len(r.prompt_ids))
            if out and longest_next * (len(out) + 1) > self.max_prefill_tokens:
                break
            out.append(self._waiting.popleft())
            longest = longest_next
        return out

    def _prefill(self, reqs: list[GenerationRequest]) -> None:
        b = len(reqs)
        s = max(len(r.prompt_ids) for r in reqs)
        ids = np.full((b, s), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, s), dtype=np.int64)
        for i, r in enumerate(reqs):
            n = len(r.prompt_ids)
            ids[i, s - n :] = r.prompt_ids
            mask[i, s - n :] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        t0 = time.perf_counter()
        logits, present = self.model.forward(ids, mask, pos, self.model.new_past(b))
        self.stats.prefill(b, int(b * s), time.perf_counter() - t0)
        last = np.asarray(logits[:, -1, :], dtype=np.float32)
        present = [np.asarray(p) for p in present]
        self._merge(reqs, present, mask)
        now = time.perf_counter()
        for i, r in enumerate(reqs):
            r.first_token_time = now
            self.stats.first_token(now - r.arrival)
            self._accept_token(r, sample_token(last[i], r.params, r.rng))
        self._retire()

    def _merge(self, reqs: list[GenerationRequest], past: list[np.ndarray], mask: np.ndarray) -> None:
        if not self._running:
            self._running, self._past, self._mask = list(reqs), past, mask
            return
        ax = self._seq_axis
        t_run, t_new = self._mask.shape[1], mask.shape[1]
        t = max(t_run, t_new)

        def left_pad(arrs: list[np.ndarray], m: np.ndarray, length: int):
            extra = length - m.shape[1]
            if extra == 0:
                return arrs, m
            widths = [(0, 0)] * arrs[0].ndim
            widths[ax] = (extra, 0)
            return [np.pad(a, widths) for a in arrs], np.pad(m, ((0, 0), (extra, 0)))

        p_run, m_run = left_pad(self._past, self._mask, t)
        p_new, m_new = left_pad(past, mask, t)
        self._past = [np.concatenate([a, c], axis=0) for a, c in zip(p_run, p_new)]
        self._mask = np.concatenate([m_run, m_new], axis=0)
        self._running = self._running + list(reqs)

    def _decode_step(self) -> None:
        b = len(self._running)
        last = np.array([[r.generated[-1]] for r in self._running], dtype=np.int64)
        pos = self._mask.sum(axis=1, keepdims=True).astype(np.int64)  # real tokens so far = next position
        mask = np.concatenate([self._mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        t0 = time.perf_counter()
        logits, present = self.model.forward(last, mask, pos, self._past)
        self.stats.decode_step(b, time.perf_counter() - t0)
        self.steps += 1
        self._past = [np.asarray(p) for p in present]
        self._mask = mask
        logits = np.asarray(logits[:, -1, :], dtype=np.float32)
        for i, r in enumerate(self._running):
            if r.finish_reason is None:
                self._accept_token(r, sample_token(logits[i], r.params, r.rng))
        self._retire()

    def _accept_token(self, r: GenerationRequest, tok: int) -> None:
        if r.cancelled:
            self._mark_cancelled(r)
            return
        p = r.params
        if r.detok is None:
            r.detok = IncrementalDetokenizer(self.tokenizer)
        if tok in self.eos_token_ids and not p.ignore_eos:
            r.finish_reason = "stop"
            self._finish(r, r.unsent + r.detok.flush())
            return
        r.generated.append(tok)
        r.unsent += r.detok.push(tok)
        at_length = len(r.generated) >= p.max_tokens
        if at_length:
            r.unsent += r.detok.flush()
        cut = _first_stop(r.unsent, p.stop) if p.stop else None
        if cut is not None:
            r.finish_reason = "stop"
            self._finish(r, r.unsent[:cut])
        elif at_length:
            r.finish_reason = "length"
            self._finish(r, r.unsent)
        else:
            safe = len(r.unsent) - _held_back(r.unsent, p.stop)
            delta, r.unsent = r.unsent[:safe], r.unsent[safe:]
            r.emit(Event("token", text=delta, token_id=tok))

    def _finish(self, r: GenerationRequest, rest: str) -> None:
        """``rest``: the text not emitted yet, already cut at a stop string."""
        r.unsent = ""
        r.finish_time = time.perf_counter()
        self.stats.finished(len(r.prompt_ids), len(r.generated), r.finish_reason or "stop")
        r.emit(Event("done", text=rest, finish_reason=r.finish_reason))

    def _mark_cancelled(self, r: GenerationRequest) -> None:
        """The client went away: counted in the metrics like any finished request, nothing emitted."""
        if r.finish_reason is None:
            r.finish_reason = "cancelled"
            self.stats.finished(len(r.prompt_ids), len(r.generated), "cancelled")

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self._running) if r.finish_reason is None and not r.cancelled]
        for r in self._running:
            if r.cancelled:
                self._mark_cancelled(r)
        if len(keep) == len(self._running):
            return
        self.stats.queue(len(self._waiting), len(keep))  # the gauges return to idle with the batch
        if not keep:
            self._running, self._past, self._mask = [], None, None
            return
        idx = np.array(keep)
        self._running = [self._running[i] for i in keep]
        self._past = [p[idx] for p in self._past]
        self._mask = self._mask[idx]
        # Drop leading columns no remaining row attends to (a departed long prompt's padding).
        used = np.flatnonzero(self._mask.any(axis=0))
        first = int(used[0]) if used.size else 0
        if first > 0:
            sl = [slice(None)] * self._past[0].ndim
            sl[self._seq_axis] = slice(first, None)
            self._past = [np.ascontiguousarray(p[tuple(sl)]) for p in self._past]
            self._mask = self._mask[:, first:]
