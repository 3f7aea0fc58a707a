"""``kdship cache``: run the teacher once over a dataset and write its targets into a store.

The work is split into shards of consecutive *input rows*, planned before the teacher runs from the
rendered token counts: by default a shard closes once its rows reach ``--shard-positions`` (65,536)
positions (generate: prompt + max-new-tokens, times samples, an upper bound); with ``--shard-size N``
every shard holds N samples' rows instead. Either way the layout depends only on the data and the
settings: a killed run, a resumed run, and N processes (``--num-shards N --shard-index I``: process
I does the shards s with s % N == I) all produce the same shards. Shards are big because a reader
pays zarr's fixed cost (~12 ms of CPU per shard) once per shard: at ~4k positions per shard that
cost dominates decoding; at 64k it is small (bench/train_throughput.py). Each shard is written completely, then
committed atomically (``kdship.store``); a resumed run skips committed shards and redoes the rest.
Generation is reproducible per (row, sample): its seed is derived from (--seed, row index), so a
redone shard is bit-identical.

Targets (``--targets``, see ``kdship/cache/targets.py`` and cache/FORMAT.md):

* ``headtail`` (default): the exact top-h head (h = ``--top-k``, default 4), the data token's own
  logprob, the exact rest mass beyond them, and ``--draws`` N tokens drawn from the teacher's residual
  distribution beyond the head: an unbiased estimate of the whole distribution. By default the store
  serves the default loss (fkl + CE): the draws' logprobs are not kept (fkl's gradient needs none) and
  the bytes buy N = 16 stratified draws (``--far-oversample 3 --far-draws 4``), ~48 bytes per position
  with SmolLM2 (bench/train_fidelity_smollm2.py). ``--draw-logprobs`` keeps them (N = 8 plain draws by
  default, ~47 B): the store every divergence (rkl, jsd, skl, srkl, tvd) and ``--draw-estimator cv`` trains from.
* ``topk``: the top-k ids and logprobs (k = ``--top-k``, default 32); the tail is one bucket or dropped.
* ``sampled`` (random-sampling KD, arXiv:2503.16870): N = top_k draws from the whole distribution.

Draws are exact with ``--backend hf`` (the full softmax); with vLLM they come from the top-K'
candidates (``--sampled-candidates``, default 4096), so the residual mass beyond the top-K' is never
drawn: headtail stores it per row (``beyond_logmass``, the trainer's "beyond" bucket), the run's
summary reports its mean (``missing_mass``) and the header records K'.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdship.config import signature_defaults
from kdship.cache.targets import TargetSpec, draw_headtail_targets, draw_sampled_targets
from kdship.data import DataError, Row, data_fingerprint, read_rows
from kdship.store import Shard, StoreHeader, StoreWriter, shard_path

log = logging.getLogger("kdship.cache")

MODES = ("score", "generate")
OVERFLOW = ("truncate", "skip", "error")
TARGETS = ("headtail", "topk", "sampled")
# --top-k's default per target kind: the exact head of headtail, k of topk, the draws of sampled
TOP_K_DEFAULT = {"headtail": 4, "topk": 32, "sampled": 32}
BACKENDS = ("vllm", "hf", "openai")


class CacheError(RuntimeError):
    """A run that cannot proceed as asked; the message names the option, file or row."""


class StoreMismatch(CacheError):
    """``--resume`` on a store written with other settings (another teacher, data or targets)."""


def _row_seed(seed: int, row: int) -> int:
    d = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=4).digest()
    return int.from_bytes(d, "little") & 0x3FFFFFFF  # room for + sample number, < 2**31


def _row_record(row: Row) -> dict[str, Any]:
    rec = dict(row.extra)
    for k in ("prompt", "response", "text", "messages"):
        v = getattr(row, k)
        if v is not None:
            rec[k] = v
    return rec


def _check_teacher(teacher: str, backend: str) -> None:
    p = Path(teacher)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file() and backend != "openai":
            raise CacheError(f"teacher {teacher}: not a Hugging Face model directory (no config.json)")
        return
    looks_like_hub_id = teacher.count("/") == 1 and not teacher.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CacheError(f"teacher {teacher}: no such directory (give a local HF model directory or a hub id)")


def cache(
    teacher: str,
    data: str,
    out: str,
    mode: str = "score",
    top_k: int | None = None,
    backend: str = "vllm",
    targets: str | None = None,
    draws: int | None = None,
    certain_exact: bool = False,
    draw_logprobs: bool | None = None,
    draw_power: float = 1.0,
    far_oversample: int | None = None,
    far_draws: int | None = None,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    max_length: int = 2048,
    overflow: str = "error",
    shard_size: int | None = None,
    shard_positions: int = 65536,
    resume: bool = True,
    overwrite: bool = False,
    skip_bad: bool = False,
    num_shards: int = 1,
    shard_index: int = 0,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    teacher_url: str | None = None,
    api_key: str | None = None,
    filter: str | None = None,  # noqa: A002 - the CLI flag's name
    min_new_tokens: int | None = None,
    max_response_tokens: int | None = None,
    dedupe: bool = False,
    require_finished: bool = False,
    sampled_candidates: int = 4096,
    split: str | None = None,
    hidden_layers: str | list[int] | None = None,
    hidden_dim: int | None = None,
    progress: bool = True,
    teacher_backend=None,
) -> dict[str, Any]:
    """Cache the teacher's targets for ``data`` into the store ``out`` (path or fsspec URL).

    Returns a summary dict (rows, samples, positions, rejects by reason, shards written/skipped,
    tokens/s, complete). ``teacher_backend`` lets a caller pass a ready ``TeacherBackend``.
    The steps: check the options, identify the teacher, render the rows, plan the shards and the
    header, then write every shard not yet committed (the teacher engine is built only if one is).
    """
    t_start = time.time()
    o = _Options(**{k: v for k, v in locals().items() if k in _Options.__dataclass_fields__})
    _check_options(o)
    teacher_id = _identify_teacher(o)
    items, rejects, n_records = _render_rows(o, teacher_id)
    shard_bounds = _plan_shard_bounds(o, items, n_records)
    header = _store_header(o, teacher_id, n_records, len(shard_bounds))
    backend_ref = _LazyBackend(o, teacher_id)
    if o.backend == "openai":
        header.top_k = backend_ref.get().effective_top_k(o.top_k)
    writer = _open_writer(out, header, overwrite, resume)
    committed = set(writer.committed())
    mine = [s for s in range(len(shard_bounds)) if s % num_shards == shard_index]
    todo = [s for s in mine if shard_path(s) not in committed]
    projection = None
    if header.hidden_states and todo:  # fitted once, before the first shard; a resumed run reads it back
        from kdship.cache.hidden import fit_on_first_rows

        if not writer.is_local and o.shard_index != 0 and writer.projection() is None:
            # object stores have no lock: two writers fitting at once could each write their own
            raise CacheError(f"{out}: --hidden-layers on an object store with several writers: run --shard-index 0 first "
                             "(it writes the projection before its first shard), then the others")
        projection = writer.ensure_projection(lambda: fit_on_first_rows(backend_ref.get(), items, o.hidden_layers, o.hidden_dim))
    stats, reject_counts = _write_shards(o, writer, todo, shard_bounds, items, rejects, backend_ref, header.top_k, teacher_id, projection)
    n_rejects = writer.rebuild_rejects()
    complete = writer.mark_complete(len(shard_bounds))
    return _summary(o, stats, reject_counts, backend_ref, t_start, header.top_k, n_records, len(shard_bounds), len(todo), len(mine), n_rejects, complete)


# every option's default, stated once (cache()'s signature): the CLI's help and YAML keys read it
DEFAULTS: dict[str, Any] = signature_defaults(cache, exclude=("teacher_backend",))


@dataclass
class _Options:
    """``cache()``'s arguments, handed to its steps as one object."""

    teacher: str
    data: str
    out: str
    mode: str
    top_k: int | None
    backend: str
    targets: str | None
    draws: int | None  # None: headtail_defaults() by draw_logprobs
    certain_exact: bool
    draw_logprobs: bool | None  # None: kept for every target kind but headtail (and for --draw-power)
    draw_power: float
    far_oversample: int | None
    far_draws: int | None
    samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    max_length: int
    overflow: str
    shard_size: int | None
    shard_positions: int
    resume: bool
    overwrite: bool
    skip_bad: bool
    num_shards: int
    shard_index: int
    tensor_parallel_size: int
    dtype: str
    teacher_url: str | None
    api_key: str | None
    filter: str | None
    min_new_tokens: int | None
    max_response_tokens: int | None
    dedupe: bool
    require_finished: bool
    sampled_candidates: int
    split: str | None
    hidden_layers: Any  # "4,8" or [4, 8]; a list after _check_options
    hidden_dim: int | None
    progress: bool
    teacher_backend: Any

    @property
    def generation_filters(self) -> bool:
        return bool(self.filter or self.min_new_tokens or self.max_response_tokens or self.dedupe or self.require_finished)


@dataclass
class _Teacher:
    """The teacher as the store records it: tokenizer, fingerprint, vocabulary, context, EOS ids."""

    tok: Any
    fingerprint: dict[str, Any]
    vocab: int
    max_len: int
    eos_ids: list[int]


DTYPES = ("auto", "float32", "bfloat16", "float16")  # the teacher's compute dtype (vllm, hf)

# The default headtail store serves the default loss (fkl + CE): without the draws' logprobs, whose fkl
# gradient needs none, the bytes buy 16 stratified draws, 4 of them on the residual's far tail at 3x
# the density; --draw-logprobs gives the store every divergence can train from, 8 plain draws.
# Measured on SmolLM2, two seeds, 640 passages (bench/train_fidelity_smollm2.py): 1.038 / 1.039x
# full-logit online KD at 47.7 B/position, against 1.062 / 1.068x for the 8-draw store at 47.1 B.
LEAN_DRAWS, FULL_DRAWS = 16, 8
LEAN_FAR_OVERSAMPLE, LEAN_FAR_SHARE = 3, 4  # far draws = draws // LEAN_FAR_SHARE


def headtail_defaults(draw_logprobs: bool, draws: int | None = None, plain_draws: bool = False) -> dict[str, int]:
    """The headtail draw options a store gets when not given: ``draws`` and ``far_oversample`` /
    ``far_draws`` by whether the draws' logprobs are kept (``plain_draws``: --certain-exact or
    --draw-power, which do not combine with stratified draws)."""
    n = draws if draws is not None else (FULL_DRAWS if draw_logprobs else LEAN_DRAWS)
    far = 1 if (draw_logprobs or plain_draws or n // LEAN_FAR_SHARE < 1) else LEAN_FAR_OVERSAMPLE
    return {"draws": n, "far_oversample": far, "far_draws": max(1, n // LEAN_FAR_SHARE)}


def _check_options(o: _Options) -> None:
    """Refuse bad combinations, naming the flag; fill the target kind's defaults (targets, top_k)."""
    if o.mode not in MODES:
        raise CacheError(f"--mode {o.mode!r}: expected one of {', '.join(MODES)}")
    if o.overflow not in OVERFLOW:
        raise CacheError(f"--overflow {o.overflow!r}: expected one of {', '.join(OVERFLOW)}")
    if o.targets is None:  # headtail needs the teacher's distribution; an HTTP teacher gives its top-k only
        o.targets = "topk" if o.backend == "openai" else "headtail"
    if o.targets not in TARGETS:
        raise CacheError(f"--targets {o.targets!r}: expected one of {', '.join(TARGETS)}")
    if o.backend not in BACKENDS:
        raise CacheError(f"--backend {o.backend!r}: expected one of {', '.join(BACKENDS)}")
    if o.dtype not in DTYPES:
        raise CacheError(f"--dtype {o.dtype!r}: expected one of {', '.join(DTYPES)}")
    if o.top_k is None:
        o.top_k = TOP_K_DEFAULT.get(o.targets, 32)
    if o.top_k < 1:
        raise CacheError(f"--top-k {o.top_k}: must be >= 1")
    if o.draw_logprobs is None:  # kept where the store needs them: other kinds carry them anyway, --draw-power weights by them
        o.draw_logprobs = o.targets != "headtail" or o.draw_power != 1.0
    for k, v in headtail_defaults(o.draw_logprobs, o.draws, o.targets != "headtail" or o.certain_exact or o.draw_power != 1.0).items():
        if getattr(o, k) is None:
            setattr(o, k, v)
    if o.targets == "headtail" and not 1 <= o.draws <= 255:
        raise CacheError(f"--draws {o.draws}: must be in 1..255")
    if not o.draw_logprobs and o.targets != "headtail":
        raise CacheError(f"--no-draw-logprobs applies to --targets headtail (got {o.targets})")
    if o.draw_power != 1.0 and (o.targets != "headtail" or not 0.0 < o.draw_power <= 1.0 or not o.draw_logprobs):
        raise CacheError(f"--draw-power {o.draw_power}: applies to --targets headtail with the draws' logprobs (their weights need p), in (0, 1]")
    if o.far_oversample != 1:
        bad = o.targets != "headtail" or o.far_oversample < 1 or not 1 <= o.far_draws < o.draws or o.certain_exact or o.draw_power != 1.0
        if bad or o.far_oversample * (o.draws - o.far_draws) + o.far_draws > 255:
            raise CacheError(f"--far-oversample {o.far_oversample} --far-draws {o.far_draws}: applies to --targets headtail without "
                             f"--certain-exact or --draw-power, with 1 <= --far-draws < --draws ({o.draws}) and oversample x near draws + far draws <= 255")
    if o.samples < 1:
        raise CacheError(f"--samples {o.samples}: must be >= 1")
    if o.samples > 1 and o.mode != "generate":
        raise CacheError("--samples applies to --mode generate only")
    if not (o.num_shards >= 1 and 0 <= o.shard_index < o.num_shards):
        raise CacheError(f"--shard-index {o.shard_index} / --num-shards {o.num_shards}: need 0 <= index < num-shards")
    if o.shard_size is not None and o.shard_size < 1:
        raise CacheError(f"--shard-size {o.shard_size}: must be >= 1")
    if o.shard_size is None and o.shard_positions < 1:
        raise CacheError(f"--shard-positions {o.shard_positions}: must be >= 1")
    if o.filter not in (None, "answer-match"):
        raise CacheError(f"--filter {o.filter!r}: known filters: answer-match")
    if o.generation_filters and o.mode != "generate":
        raise CacheError("--filter, length bounds, --dedupe and --require-finished apply to --mode generate only")
    if o.backend == "openai" and not o.teacher_url:
        raise CacheError("--backend openai needs --teacher-url URL")
    if o.backend == "openai" and o.targets != "topk":
        raise CacheError(f"--targets {o.targets} needs the teacher's distribution; use --backend vllm or hf, or --targets topk")
    _check_hidden_options(o)


def _check_hidden_options(o: _Options) -> None:
    """--hidden-layers / --hidden-dim: both or neither, and a backend that can return hidden states
    (refused here, before any engine is built)."""
    from kdship.cache.hidden import HiddenStatesError, parse_layers

    try:
        o.hidden_layers = parse_layers(o.hidden_layers)
    except HiddenStatesError as e:
        raise CacheError(str(e)) from None
    if (o.hidden_layers is None) != (o.hidden_dim is None):
        raise CacheError("--hidden-layers and --hidden-dim go together (the layers to store and the dimension to project them to)")
    if o.hidden_layers is None:
        return
    no_hidden = o.backend != "hf" if o.teacher_backend is None else not getattr(o.teacher_backend, "supports_hidden_states", False)
    if no_hidden:
        why = "vLLM's API returns logprobs, not hidden states" if o.backend == "vllm" else "an OpenAI-compatible API returns no hidden states"
        raise CacheError(f"--hidden-layers needs --backend hf (a transformers forward): {why}")


def _identify_teacher(o: _Options) -> _Teacher:
    from kdship.fingerprint import teacher_fingerprint
    from kdship.render import load_tokenizer

    _check_teacher(o.teacher, o.backend)
    try:
        tok = load_tokenizer(o.teacher)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/...
        raise CacheError(f"teacher {o.teacher}: cannot load its tokenizer: {e}") from e
    fp = teacher_fingerprint(o.teacher, tok)
    if fp["weights_sha256"] is None and o.backend != "openai" and Path(o.teacher).is_dir():
        raise CacheError(f"teacher {o.teacher}: no weight files (*.safetensors, *.bin) in the directory")
    if o.backend == "openai" and o.teacher_url:
        from kdship.cache.openai_backend import OpenAIBackendError, redact_url, served_model_id

        try:
            fp["served_model"] = served_model_id(o.teacher_url, o.api_key)
        except OpenAIBackendError as e:
            raise CacheError(f"--teacher-url {redact_url(o.teacher_url)}: cannot list its models: {e}") from e
        fp["url"] = redact_url(o.teacher_url)  # a URL may carry credentials: never into the header
    vocab = fp["vocab_size"] or len(tok)
    if o.top_k > vocab:
        raise CacheError(f"--top-k {o.top_k} is larger than the teacher's vocabulary ({vocab} tokens)")
    model_max = _model_max_positions(o.teacher)
    max_len = min(o.max_length, model_max) if model_max else o.max_length
    return _Teacher(tok, fp, vocab, max_len, _eos_ids(o.teacher, tok))


def _render_rows(o: _Options, t: _Teacher) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]], int]:
    """Data rows -> {row index: tokens, loss mask} within the length budget; refused rows as rejects
    (or an error naming the row, without --skip-bad). Also the number of input records."""
    from kdship.render import RenderError, render_prompt, render_score

    mode, eff_max_len, max_new_tokens, skip_bad, overflow, tok = o.mode, t.max_len, o.max_new_tokens, o.skip_bad, o.overflow, t.tok
    try:
        rows, bad = read_rows(o.data, skip_bad=skip_bad, split=o.split)
    except DataError as e:
        raise CacheError(str(e)) from e
    rejects: list[dict[str, Any]] = [r.as_dict() for r in bad]
    items: dict[int, dict[str, Any]] = {}
    for row in rows:
        try:
            if mode == "score":
                toks, mask = render_score(row, tok)
            else:
                toks, mask = np.asarray(render_prompt(row, tok), np.int32), None
        except RenderError as e:
            if not skip_bad:
                raise CacheError(f"{row.source}: {e} (pass --skip-bad to write bad rows to rejects.jsonl instead)") from None
            rejects.append({"row": row.index, "source": row.source, "reason": str(e)})
            continue
        budget = eff_max_len if mode == "score" else eff_max_len - max_new_tokens
        if mode == "generate" and budget < 1:
            raise CacheError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt within --max-length {eff_max_len}")
        if len(toks) > budget:
            what = f"{row.source}: {len(toks)} tokens exceed {'--max-length' if mode == 'score' else '--max-length minus --max-new-tokens'} ({budget})"
            if overflow == "error":
                raise CacheError(f"{what}; use --overflow truncate or skip, or a larger --max-length")
            if overflow == "skip":
                rejects.append({"row": row.index, "source": row.source, "reason": f"overflow: {len(toks)} tokens > {budget}"})
                continue
            toks = toks[:budget]
            mask = mask[:budget] if mask is not None else None
        if len(toks) < (2 if mode == "score" else 1):
            reason = "renders to fewer than 2 tokens; nothing to score" if mode == "score" else "renders to an empty prompt"
            if not skip_bad:
                raise CacheError(f"{row.source}: {reason}")
            rejects.append({"row": row.index, "source": row.source, "reason": reason})
            continue
        items[row.index] = {"row": row, "tokens": toks, "mask": mask}
    n_records = max([r.index for r in rows] + [r["row"] for r in rejects] + [-1]) + 1
    return items, rejects, n_records


def _plan_shard_bounds(o: _Options, items: dict[int, dict[str, Any]], n_records: int) -> list[tuple[int, int]]:
    """[first row, end row) of every shard: --shard-size rows each, or rows up to --shard-positions."""
    if o.shard_size is not None:
        rows_per_shard = max(1, o.shard_size // o.samples)
        shard_starts = list(range(0, max(1, n_records), rows_per_shard))
    else:
        def est_positions(item) -> int:
            return len(item["tokens"]) if o.mode == "score" else (len(item["tokens"]) + o.max_new_tokens) * o.samples

        shard_starts = plan_shards(n_records, {i: est_positions(it) for i, it in items.items()}, o.shard_positions)
    return list(zip(shard_starts, shard_starts[1:] + [max(n_records, shard_starts[-1])]))


def _store_header(o: _Options, t: _Teacher, n_records: int, n_total_shards: int) -> StoreHeader:
    return StoreHeader(
        mode=o.mode,
        top_k=None if o.backend == "openai" else o.top_k,  # an HTTP teacher's cap decides, once it answers
        targets=o.targets,
        target_sampling=_target_sampling(_target_spec(o, o.top_k), o.backend, o.sampled_candidates, o.seed),
        teacher=t.fingerprint,
        sampling=(
            {"samples": o.samples, "temperature": o.temperature, "top_p": o.top_p, "max_new_tokens": o.max_new_tokens, "seed": o.seed}
            if o.mode == "generate"
            else {}
        ),
        logprobs_mode="raw_logprobs",
        max_length=t.max_len,
        overflow=o.overflow,
        data=dict(data_fingerprint(o.data), num_records=n_records, skip_bad=o.skip_bad, split=o.split),
        shard_size=o.shard_size,
        shard_positions=o.shard_positions if o.shard_size is None else None,
        filters=(
            {"filter": o.filter, "min_new_tokens": o.min_new_tokens, "max_new_tokens": o.max_response_tokens, "dedupe": o.dedupe,
             "require_finished": o.require_finished}
            if o.mode == "generate"
            else None
        ),
        num_shards_total=n_total_shards,
        hidden_states=_hidden_header(o),
        compute_dtype=resolved_dtype(o.backend, o.dtype),
    )


def _hidden_header(o: _Options) -> dict[str, Any] | None:
    from kdship.cache.hidden import HiddenStatesError, hidden_spec

    if o.hidden_layers is None:
        return None
    try:
        return hidden_spec(o.teacher, o.hidden_layers, int(o.hidden_dim))
    except HiddenStatesError as e:
        raise CacheError(str(e)) from None


class _LazyBackend:
    """The teacher backend, built on first use (a finished store is checked without starting an engine)
    and timed (the summary's backend_seconds)."""

    def __init__(self, o: _Options, t: _Teacher):
        self.o, self.t = o, t
        self.backend = o.teacher_backend
        self.build_seconds = 0.0

    def get(self):
        o, t = self.o, self.t
        if self.backend is None:
            t_build = time.time()
            self.backend = _make_backend(o.backend, o.teacher, t.tok, t.eos_ids, o.tensor_parallel_size, o.teacher_url, o.api_key, t.max_len, o.top_k,
                                         o.targets, o.sampled_candidates, o.dtype)
            self.build_seconds = time.time() - t_build
        if not isinstance(self.backend, _TimedBackend):
            self.backend = _TimedBackend(self.backend)
        return self.backend

    @property
    def seconds(self) -> float:
        return self.backend.seconds if isinstance(self.backend, _TimedBackend) else 0.0


# Items (one engine call's results, or a shard's end) the engine thread may queue ahead of the writer.
# A call's results are its raw candidates, up to MAX_ENTRIES_PER_CALL (~256 MB as numpy at 8 B each,
# 270x its targets at K' = 4096), so in flight stay ~4 calls' worth: the engine's, 2 queued, the
# writer's. Queueing whole shards instead would hold ~2 GB each with the defaults.
WRITER_QUEUE = 2
# Tests only: False runs the writer's work inline on the engine thread (the sequential reference).
_BACKGROUND_WRITER = True


def _write_shards(o: _Options, writer, todo, shard_bounds, items, rejects, backend_ref: _LazyBackend, k_store: int, t: _Teacher, projection=None):
    """Teacher targets (and, with ``projection``, projected hidden states) for every shard in ``todo``,
    committed in order. This thread only calls the teacher; a background thread (``_ShardWriter``)
    does the host work after each engine call (targets, filters, Shard.build, write + commit, stats),
    overlapping the next call, so on a fast engine the store's writing does not stall it."""
    # counted by the writer thread alone; the engine thread's timings are added after it is joined
    stats = {"samples": 0, "positions": 0, "targeted_positions": 0, "generated_tokens": 0, "missing_mass_sum": 0.0, "target_rows": 0}
    reject_counts: dict[str, int] = {}
    filter_fn = _load_filter() if o.mode == "generate" and o.generation_filters else None
    bar = _Progress(len(todo), enabled=o.progress, label=f"kdship cache {o.mode} -> {o.out}")
    spec = _target_spec(o, k_store)
    samples_out: list[dict[str, Any]] = []  # the shard being assembled, and its filter rejects (writer thread only)
    filter_rejects: list[dict[str, Any]] = []

    def host(msg) -> None:  # the writer thread: one engine call's host work, or a shard's end
        s, work = msg
        if work is not None:
            samples, rej = work() if callable(work) else work
            samples_out.extend(samples)
            filter_rejects.extend(rej)
            return
        lo, hi = shard_bounds[s]
        shard_rejects = [r for r in rejects if lo <= r["row"] < hi] + filter_rejects
        shard = Shard.build(samples_out, writer.top_k, targets=o.targets, lp_width=writer.lp_width)
        writer.write_shard(s, shard, rejects=shard_rejects, extra_attrs={"rows": [lo, hi]})
        _exit_after_first_commit_for_tests(s)
        stats["samples"] += shard.num_samples
        stats["positions"] += shard.num_positions
        targeted = shard.loss_mask & shard.has_target()
        stats["targeted_positions"] += int(targeted.sum())
        stats["missing_mass_sum"] += float(sum(x.get("_missing_mass", 0.0) for x in samples_out))
        stats["target_rows"] += int(shard.has_target().sum())
        stats["generated_tokens"] += int(shard.loss_mask.sum()) if o.mode == "generate" else 0
        for r in shard_rejects:
            key = r["reason"].split(":")[0]
            reject_counts[key] = reject_counts.get(key, 0) + 1
        bar.advance(shard.num_positions)
        samples_out.clear()
        filter_rejects.clear()

    w = _ShardWriter(host, background=_BACKGROUND_WRITER)
    teacher_seconds = 0.0
    try:
        for s in todo:
            lo, hi = shard_bounds[s]
            shard_items = [items[i] for i in range(lo, hi) if i in items]
            t0, stall0 = time.perf_counter(), w.stall
            if shard_items:
                be = backend_ref.get()
                if o.mode == "score":
                    calls = _score_calls(be, shard_items, spec, o.sampled_candidates, o.seed, t.vocab)
                else:
                    calls = _generate_calls(be, shard_items, spec, o, t.vocab, t.tok, filter_fn)
                for work in calls:
                    if projection is not None:  # the second forward needs the targets' rows: their host work runs here first
                        from kdship.cache.hidden import attach_hidden_states

                        work = work()
                        attach_hidden_states(be, work[0], projection)
                    w.put((s, work))
            w.put((s, None))
            teacher_seconds += time.perf_counter() - t0 - (w.stall - stall0)
    finally:
        w.close()  # the shards queued whole are committed; one the engine did not finish is dropped
        bar.close()
    if w.error is not None:  # the writer failed on the last shard: the loop above did not see it
        raise w.error
    stats.update(teacher_seconds=teacher_seconds, writer_stall_seconds=w.stall, writer_busy_seconds=w.busy)
    return stats, reject_counts


class _ShardWriter:
    """``handle(msg)`` for every message put, in order, on one background thread fed by a bounded
    queue (WRITER_QUEUE), or inline with ``background=False``. ``stall``: seconds the putting thread
    waited on it (a full queue; inline, all of the work); ``busy``: seconds inside ``handle``.
    An error in ``handle`` is kept and raised by the next ``put``; the messages after it are dropped."""

    def __init__(self, handle, background: bool = True):
        self.handle, self.error, self.stall, self.busy = handle, None, 0.0, 0.0
        self.thread = None
        if background:
            self.q: queue.Queue = queue.Queue(maxsize=WRITER_QUEUE)
            # daemon: should the process exit without close() (a second Ctrl-C in it), the thread must
            # not keep it alive; a write cut short is never committed (kdship.store) and is redone on resume
            self.thread = threading.Thread(target=self._run, name="kdship-cache-writer", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while (msg := self.q.get()) is not None:
            if self.error is None:  # after an error the queue is still drained, so a put never blocks for good
                t = time.perf_counter()
                try:
                    self.handle(msg)
                except BaseException as e:  # noqa: BLE001 - raised again on the engine thread
                    self.error = e
                self.busy += time.perf_counter() - t

    def put(self, msg) -> None:
        if self.error is not None:
            raise self.error
        t = time.perf_counter()
        if self.thread is None:
            self.handle(msg)
            self.busy += time.perf_counter() - t
        else:
            self.q.put(msg)
        self.stall += time.perf_counter() - t

    def close(self) -> None:
        """Let the thread finish what is queued, then join it. Where an exception of the engine thread
        is on its way out, an error of the writer's own is logged rather than lost."""
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
        pending = sys.exc_info()[1]
        if self.error is not None and pending is not None and pending is not self.error:
            log.error("the shard writer failed as well: %r", self.error)


TEST_EXIT_AFTER_COMMIT = "KDSHIP_TEST_EXIT_AFTER_COMMIT"


def _exit_after_first_commit_for_tests(shard: int) -> None:
    """Tests only (tests/test_cache_ray.py): with $KDSHIP_TEST_EXIT_AFTER_COMMIT naming a marker file,
    the first process to commit a shard creates the marker (holding that shard's index) and dies at
    once, as a killed worker would; every later process (a retry) finds the marker and carries on."""
    marker = os.environ.get(TEST_EXIT_AFTER_COMMIT)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(shard).encode())
    os.close(fd)
    os._exit(1)


def _summary(o: _Options, stats, reject_counts, backend_ref: _LazyBackend, t_start, k_store, n_records, n_total_shards, n_written, n_mine, n_rejects, complete):
    elapsed = time.time() - t_start
    summary = {
        "store": str(o.out),
        "mode": o.mode,
        "targets": o.targets,
        "backend": o.backend,
        "top_k": k_store,
        "rows": n_records,
        "shards_total": n_total_shards,
        "shards_written": n_written,
        "shards_skipped": n_mine - n_written,
        **stats,
        "rejects_this_run": sum(reject_counts.values()),
        "rejects_by_reason": reject_counts,
        "rejects_in_store": n_rejects,
        "complete": complete,
        "seconds": round(elapsed, 2),
        "positions_per_second": round(stats["positions"] / stats["teacher_seconds"], 1) if stats["teacher_seconds"] else None,
        # time inside the teacher's score/generate calls vs the whole run (read, render, parse, encode, write)
        "backend_seconds": round(backend_ref.seconds, 2),
    }
    summary["backend_build_seconds"] = round(backend_ref.build_seconds, 2)
    # kdship's own share of the run: everything but the teacher's calls and the one-time engine start
    busy = elapsed - backend_ref.build_seconds
    summary["writer_overhead_fraction"] = round(1 - summary["backend_seconds"] / busy, 3) if summary["backend_seconds"] and busy > 0 else None
    summary["teacher_seconds"] = round(summary["teacher_seconds"], 2)
    # the background shard writer (_write_shards): seconds the engine thread waited on it (a full queue:
    # the stall the store's writing imposed on the teacher, ~0 when writing keeps up) and its own busy seconds
    summary["writer_stall_seconds"] = round(summary["writer_stall_seconds"], 2)
    summary["writer_busy_seconds"] = round(summary["writer_busy_seconds"], 2)
    # headtail with vLLM: mean residual mass per row beyond the top-K' candidates (never drawn; one bucket)
    missing, rows_t = summary.pop("missing_mass_sum"), summary.pop("target_rows")
    if o.targets == "headtail":
        summary["missing_mass"] = round(missing / max(1, rows_t), 6)
    return summary


# --------------------------------------------------------------------------------------------------


def plan_shards(n_records: int, positions: dict[int, int], shard_positions: int) -> list[int]:
    """First input row of each shard: consecutive rows until their positions reach ``shard_positions``.

    ``positions`` maps row index -> (estimated) positions; rows absent from it (rejected) weigh 0.
    Deterministic in its inputs, so every process and every resumed run plans the same shards.
    """
    starts, acc = [0], 0
    for r in range(n_records):
        if acc >= shard_positions:
            starts.append(r)
            acc = 0
        acc += positions.get(r, 0)
    return starts


def _open_writer(out, header, overwrite, resume):
    from kdship.store import StoreError, StoreSettingsMismatch

    try:
        return StoreWriter(out, header, overwrite=overwrite, resume=resume)
    except StoreSettingsMismatch as e:
        raise StoreMismatch(str(e)) from e
    except StoreError as e:
        raise CacheError(str(e)) from e


def _model_max_positions(teacher: str) -> int | None:
    import json

    f = Path(teacher) / "config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    cfg = cfg.get("text_config", cfg)
    v = cfg.get("max_position_embeddings")
    return int(v) if v else None


def _eos_ids(teacher: str, tok) -> list[int]:
    import json

    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    f = Path(teacher) / "generation_config.json"
    if f.is_file():
        e = json.loads(f.read_text()).get("eos_token_id")
        for x in e if isinstance(e, list) else [e]:
            if x is not None:
                ids.add(int(x))
    return sorted(ids)


def resolved_dtype(backend: str, dtype: str) -> str | None:
    """The teacher's compute dtype that ``--dtype`` means on this machine, recorded in the header so
    that a store is never resumed in another precision (a bf16 teacher is ~0.07 nat off a float32
    one): each backend's own resolution, vLLM's GPU "auto" recorded as "auto:cuda"; None with an
    HTTP teacher."""
    if backend == "openai":
        return None
    if backend == "vllm":
        from kdship.runtime.vllm_engine import engine_dtype

        d = engine_dtype(dtype)
        return "auto:cuda" if d == "auto" else d
    from kdship.cache.hf_backend import compute_dtype

    return compute_dtype(dtype)


def _make_backend(backend, teacher, tok, eos_ids, tp, teacher_url, api_key, max_len, top_k, targets, sampled_candidates, dtype):
    if backend == "hf":
        from kdship.cache.hf_backend import HFBackend

        return HFBackend(teacher, eos_token_ids=eos_ids, dtype=dtype)
    if backend == "openai":
        from kdship.cache.openai_backend import OpenAIBackend

        return OpenAIBackend(teacher_url, api_key=api_key, tokenizer=tok)
    from kdship.cache.vllm_backend import VLLMBackend
    from kdship.runtime.vllm_engine import DEFAULT_MAX_LOGPROBS, TeacherUnsupported, default_max_model_len

    need = max(top_k, sampled_candidates if targets != "topk" else 0)
    try:
        return VLLMBackend(
            teacher,
            tensor_parallel_size=tp,
            dtype=dtype,
            max_model_len=max(default_max_model_len(teacher), max_len),
            max_logprobs=max(DEFAULT_MAX_LOGPROBS, need),
            eos_token_ids=eos_ids,
        )
    except TeacherUnsupported as e:
        raise CacheError(str(e)) from e


def _load_filter():
    try:
        from kdship.cache.filters import filter_generations
    except ImportError as e:  # pragma: no cover - the module ships with kdship
        raise CacheError(f"generation filters unavailable: {e}") from e
    return filter_generations


def _target_spec(o: _Options, top_k: int) -> TargetSpec:
    """The target options of ``o`` as one object, with the k the store holds (an HTTP teacher may cap it)."""
    return TargetSpec(o.targets, int(top_k), int(o.draws), bool(o.certain_exact), bool(o.draw_logprobs), float(o.draw_power),
                      int(o.far_oversample), int(o.far_draws))


def _target_sampling(spec: TargetSpec, backend, sampled_candidates, seed):
    """The header's record of how sparse targets were drawn (None for topk)."""
    if spec.kind == "topk":
        return None
    out = {"draws": spec.draws if spec.kind == "headtail" else spec.top_k,
           "candidates": "full-vocabulary" if backend == "hf" else int(sampled_candidates), "exact": backend == "hf", "seed": seed}
    if spec.kind == "headtail":
        out["head"] = spec.top_k
        # each recorded only when it differs from the first default: stores written before the option resume as before
        if spec.certain_exact:
            out["certain_exact"] = True
        if not spec.draw_logprobs:
            out["draw_logprobs"] = False
        if spec.draw_power != 1.0:
            out["draw_power"] = spec.draw_power
        if spec.far_oversample > 1:
            out["far_oversample"], out["far_draws"] = spec.far_oversample, spec.far_draws
    return out


def _targets_for(ids, lps, spec: TargetSpec, rng, tokens=None, token_lp=None) -> dict[str, Any]:
    """One sequence's target arrays (the sample dict's target keys) from its candidate rows."""
    if spec.kind == "topk":
        return {"topk_ids": ids[:, :spec.top_k], "topk_logprobs": lps[:, :spec.top_k]}
    if spec.kind == "sampled":
        ti, tl, tw = draw_sampled_targets(ids, lps, spec.top_k, rng)
        return {"topk_ids": ti, "topk_logprobs": tl, "target_weights": tw}
    if token_lp is None:
        token_lp = np.full(len(tokens), np.nan, np.float32)
    out = draw_headtail_targets(ids, lps, tokens, token_lp, spec.top_k, spec.draws, rng, spec.certain_exact, spec.draw_logprobs, spec.draw_power,
                                spec.far_oversample, spec.far_draws)
    out["_missing_mass"] = float(out.pop("missing_mass").sum())
    return out


def _candidates_k(be, spec: TargetSpec, sampled_candidates, vocab) -> int:
    if spec.kind == "topk":
        return spec.top_k
    if be.name == "hf":
        return vocab  # the full distribution: exact sampling
    return max(spec.top_k + 1, min(int(sampled_candidates), vocab))


def _sample_rng(seed: int, row: int, sample: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(row), int(sample), 0x5A3])


# Logprob entries one engine call may return: vLLM hands them back as Python objects (~100 B each),
# so a shard of long rows at a large K' would otherwise need many GB at once.
MAX_ENTRIES_PER_CALL = 32 << 20


def _bounded_groups(items: list, entries: list[int]):
    """Consecutive runs of ``items`` whose summed ``entries`` stay within MAX_ENTRIES_PER_CALL (at least one item each)."""
    group, total = [], 0
    for it, n in zip(items, entries):
        if group and total + n > MAX_ENTRIES_PER_CALL:
            yield group
            group, total = [], 0
        group.append(it)
        total += n
    if group:
        yield group


def _score_calls(be, items, spec: TargetSpec, sampled_candidates, seed, vocab):
    """Score mode, one engine call at a time: yields each call's host work, a callable that returns
    its sample dicts (targets per sequence) and rejects (none), for the shard writer's thread."""
    kc = _candidates_k(be, spec, sampled_candidates, vocab)
    own = spec.kind == "headtail"
    for chunk in _bounded_groups(items, [len(it["tokens"]) * kc for it in items]):
        res = be.score([it["tokens"].tolist() for it in chunk], kc, **({"with_token_logprobs": True} if own else {}))
        yield functools.partial(_scored_samples, chunk, res, spec, seed, own)


def _scored_samples(chunk, res, spec: TargetSpec, seed, own):
    out = []
    for it, r in zip(chunk, res):
        ids, lps = r[0], r[1]
        tgt = _targets_for(ids, lps, spec, _sample_rng(seed, it["row"].index, 0), it["tokens"], r[2] if own else None)
        out.append({"tokens": it["tokens"], "loss_mask": it["mask"], "sample_index": it["row"].index, **tgt})
    return out, []


def _generate_calls(be, items, spec: TargetSpec, o: _Options, vocab, tok, filter_fn):
    """Generate mode, one engine call at a time: yields each call's host work (filters, then targets of
    the kept generations), as ``_score_calls``."""
    kc = _candidates_k(be, spec, o.sampled_candidates, vocab)
    for chunk in _bounded_groups(items, [o.samples * o.max_new_tokens * kc] * len(items)):
        prompts = [it["tokens"].tolist() for it in chunk]
        seeds = [_row_seed(o.seed, it["row"].index) for it in chunk]
        gens = be.generate(prompts, kc, o.samples, o.temperature, o.top_p, o.max_new_tokens, seeds)
        yield functools.partial(_generated_samples, chunk, gens, spec, kc, o, tok, filter_fn)


def _generated_samples(items, gens, spec: TargetSpec, kc, o: _Options, tok, filter_fn):
    out, rejects = [], []
    for it, row_gens in zip(items, gens):
        idx = list(range(len(row_gens)))
        if filter_fn is not None:
            texts = [tok.decode(g.token_ids, skip_special_tokens=True) for g in row_gens] if o.filter == "answer-match" else None
            try:
                res = filter_fn(
                    _row_record(it["row"]), row_gens, texts, row_index=it["row"].index, answer_match=(o.filter == "answer-match"),
                    min_new_tokens=o.min_new_tokens, max_new_tokens=o.max_response_tokens, dedupe=o.dedupe, require_finished=o.require_finished,
                )
            except ValueError as e:  # FilterError: the row lacks what the filter needs
                raise CacheError(f"{it['row'].source}: {e}") from e
            idx = list(res.kept_indices)
            for r in res.rejects:
                r.setdefault("source", it["row"].source)
                rejects.append(r)
        P = len(it["tokens"])
        for j in idx:
            g = row_gens[j]
            G = len(g.token_ids)
            ids = np.full((P + G, kc), -1, np.int32)
            lps = np.full((P + G, kc), -np.inf, np.float32)
            own = np.full(P + G, np.nan, np.float32)
            if G:
                ids[P:] = g.topk_ids[:, :kc]
                lps[P:] = g.topk_logprobs[:, :kc]
                if g.token_logprobs is not None:
                    own[P:] = g.token_logprobs
            tokens = np.concatenate([it["tokens"], np.asarray(g.token_ids, np.int32)])
            tgt = _targets_for(ids, lps, spec, _sample_rng(o.seed, it["row"].index, j), tokens, own)
            mask = np.zeros(P + G, bool)
            mask[P:] = True
            out.append({"tokens": tokens, "loss_mask": mask, "sample_index": it["row"].index, **tgt})
    return out, rejects


class _TimedBackend:
    """Wraps a backend and sums the seconds spent inside its score/generate calls."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.inner.score(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t

    def generate(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.inner.generate(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t


class _Progress:
    """A rich progress bar over shards (positions shown), silent when disabled or nothing to do."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.p = None
        if enabled and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards, {task.fields[pos]} positions"),
                              TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.p.start()
            self.task = self.p.add_task(label, total=total, pos=0)
            self.pos = 0

    def advance(self, positions: int) -> None:
        if self.p is not None:
            self.pos += positions
            self.p.update(self.task, advance=1, pos=self.pos)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()

