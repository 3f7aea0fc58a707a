"""The teacher store, format v2: the one definition that the cache writer and every reader import.

A store is a Zarr v3 group (a local folder or an fsspec URL) documented in ``cache/FORMAT.md``::

    STORE/
      zarr.json                 root group; attribute "kdship" = the header (see ``StoreHeader``)
      shards/s000000/           one group per shard, written completely, then committed
        tokens        int32 [T]       the shard's samples, concatenated
        offsets       int64 [S+1]     sample i is tokens[offsets[i]:offsets[i+1]]
        sample_index  int64 [S]       the input row each sample came from
        sample_hash   uint8 [S, 16]   blake2b-128 of the sample's int32 tokens (joins with data)
        loss_mask     bool  [T]       positions the student is trained on (response / all text)
        targets "headtail" (default):
        target_ids      int32 [T, H+N]  row j: the teacher's top-h ids for token j given tokens < j and
                                        the distinct ids drawn from its residual distribution, merged,
                                        ascending (-1 pad at the end)
        target_logprobs f32   [T, H+N]  their teacher log-probabilities; [T, X] in a store written with
                                        --no-draw-logprobs: the exact entries' only (count 0, in row
                                        order, 0 pad), X = h (+ N - 1 with --certain-exact)
        target_counts   uint8 [T, H+N]  0 = exact head entry; c > 0 = drawn c of the N times
        token_logprob   f32   [T]       the teacher's logprob of the data token tokens[j] (0 when the
                                        token is in the head: its logprob is there)
        rest_logmass    f32   [T]       log(1 - mass of the head and the data token): the residual
        beyond_logmass  f32   [T]       log of the residual mass outside the backend's top-K' candidates
                                        (never drawn; -16 = none, e.g. --backend hf): the trainer's
                                        "beyond" bucket
        targets "topk" / "sampled" (v1):
        topk_ids      int32 [T, K]    row j: teacher's top-k ids for token j given tokens < j
        topk_logprobs f32   [T, K]    their log-probabilities, sorted descending; -inf / id -1 pad
        target_weights f32  [T, K]    only in ``targets: sampled`` stores: empirical weight count/N
        optional, hint KD (``kdship cache --hidden-layers --hidden-dim``):
        hidden_states int8  [T, L, D] row j: the teacher's hidden state at position j - 1 (the one that
                                      predicts token j) at each of the header's L layers, projected to D
        hidden_scales f16   [T, L]    per (row, layer) scale: value = hidden_states * hidden_scales
      hidden_projection/        with hidden states: mean f32 [L, H], components f32 [L, D, H] (PCA),
                                variance f32 [L, D] (of each component over the fitted rows)
      rejects.jsonl             rows refused under --skip-bad, rebuilt from committed shards

Commits (crash-safe with any number of writers on any fsspec store, cache/FORMAT.md "Commits"): a
shard's arrays are written first, then its checksum (over the *decoded* arrays) into the shard
group's attributes, and only then its commit record ``commits/s000123.json``: one new object, written
whole (temp + rename on local disk; a single PUT on an object store), never rewritten. The committed
shards are the records present; nothing is read-modified-written, so concurrent writers cannot lose
each other's commits. A shard without a record does not exist for any reader; a writer deletes and
redoes it. The header's ``complete_shards`` is a snapshot written when a writer saw every shard
committed (older stores: the list itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

import warnings

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from kdship import __version__

# BitRound is a numcodecs codec, which zarr-python decodes itself; its warning that other Zarr
# implementations may lack it is documented in cache/FORMAT.md, not repeated on every open.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # v1 stores (topk / sampled targets) read unchanged
HEADER_ATTR = "kdship"
SHARDS_GROUP = "shards"
REJECTS_FILE = "rejects.jsonl"
LOCK_FILE = ".kdship.lock"
COMMITS_DIR = "commits"

# Fixed array names and dtypes: other tools rely on them (cache/FORMAT.md). Every store has these:
BASE_ARRAY_DTYPES: dict[str, str] = {
    "tokens": "int32",
    "offsets": "int64",
    "sample_index": "int64",
    "sample_hash": "uint8",
    "loss_mask": "bool",
}
# ... and the target arrays of its ``targets`` kind:
#  headtail  the exact top-h head + distinct draws from the teacher's *residual* distribution (beyond
#            the head and the data token), their counts, the data token's logprob and the exact
#            rest mass: an unbiased sparse estimate of the whole distribution (the default)
#  topk      the top-k ids and logprobs (v1's default)
#  sampled   distinct draws from the whole distribution with weights count/N (v1)
TARGET_ARRAY_DTYPES: dict[str, dict[str, str]] = {
    "headtail": {
        "target_ids": "int32",
        "target_logprobs": "float32",
        "target_counts": "uint8",
        "token_logprob": "float32",
        "rest_logmass": "float32",
        "beyond_logmass": "float32",
    },
    "topk": {"topk_ids": "int32", "topk_logprobs": "float32"},
    "sampled": {"topk_ids": "int32", "topk_logprobs": "float32", "target_weights": "float32"},
}
TARGET_KINDS = tuple(TARGET_ARRAY_DTYPES)
# Optional per-shard arrays of stores with teacher hidden states (hint KD). They have their own
# checksum (``hidden_checksum_sha256``), so a reader that does not need them never decodes them.
HIDDEN_ARRAY_DTYPES: dict[str, str] = {"hidden_states": "int8", "hidden_scales": "float16"}
# ... and the projection they were made with, once per store (root group, written before any shard)
PROJECTION_GROUP = "hidden_projection"
PROJECTION_ARRAY_DTYPES: dict[str, str] = {"mean": "float32", "components": "float32", "variance": "float32"}
HIDDEN_QMAX = 127  # int8 codes in -127..127: symmetric, so 0 stays exactly 0
ARRAY_DTYPES: dict[str, str] = {**BASE_ARRAY_DTYPES, **TARGET_ARRAY_DTYPES["topk"]}  # a top-k store's arrays
HASH_BYTES = 16
NO_TARGET_ID = -1  # with logprob -inf: row 0 of a sample, prompt rows that were not scored

# headtail encoding (bench/cache_bytes.py measured the alternatives): ids sorted ascending within a
# row and delta-coded (numcodecs Delta over the row-major chunk), as uint16 when the vocabulary fits
# (padding 65535): ~1.5 B per id; logprobs and the data token's logprob as fixed-point int16
# (numcodecs FixedScaleOffset, 1/512 nat steps: |error| <= 9.8e-4 nat, every probability within 0.1 %
# of its value; below -32 nat clamped to -32, i.e. p < 1.3e-14); log(rest mass) at 1/2048 nat steps
# (the rest mass within 0.025 % of its value, floor -16 nat: absolute error < 1.2e-7 below it).
LOGPROB_SCALE = 512
LOGPROB_FLOOR = -32.0
REST_SCALE = 2048
REST_FLOOR = -16.0
HEADTAIL_CLEVEL = 9  # the arrays are small; zstd 9 saved ~2 % over 5 at no measurable write cost
UINT16_PAD = 65535

# Positions per chunk along T. Each array of a shard is one zarr "shard" file holding its chunks,
# so a store has a handful of files per shard group, and a reader can still decode chunk by chunk.
# zarr-python spends ~0.5 ms of CPU per chunk outside the codec, so chunks are large: at 4096 the
# loader decoded 0.74 M positions per CPU-second, at 32768 1.2 M (bench/train_throughput.py).
CHUNK_POSITIONS = 32768



def _setting() -> Any:
    """A required header field that defines what the targets mean (compared on resume)."""
    return field(metadata={"setting": True})


@dataclass
class StoreHeader:
    """The header: root attribute ``"kdship"`` of a store (cache/FORMAT.md, "Header"), built by
    ``kdship cache`` and read back by every reader as the dict ``StoreReader.header``.

    Fields marked as settings define what the targets mean: re-opening a store with any of them
    different is refused (unless overwrite), since targets cached under one teacher, template or k
    are wrong under another. The writer adds the bookkeeping keys (``format_version``,
    ``kdship_version``, ``complete_shards``, ``complete``) and, when None, the target kind's
    ``encoding``.
    """

    mode: str = _setting()
    top_k: int | None = _setting()
    targets: str = _setting()
    target_sampling: dict[str, Any] | None = _setting()
    teacher: dict[str, Any] = _setting()
    sampling: dict[str, Any] = _setting()
    logprobs_mode: str = _setting()
    max_length: int | None = _setting()
    overflow: str = _setting()
    data: dict[str, Any] = _setting()
    shard_size: int | None = _setting()
    shard_positions: int | None = _setting()
    filters: dict[str, Any] | None = _setting()
    encoding: dict[str, Any] | None = field(default=None, metadata={"setting": True})
    # teacher hidden states (hint KD): layers, dim, the teacher's hidden size, projection and encoding
    hidden_states: dict[str, Any] | None = field(default=None, metadata={"setting": True})
    # the teacher's compute dtype as resolved on this machine (float32, bfloat16, float16, or
    # "auto:cuda" for vLLM's choice on a GPU); None for an HTTP teacher (its server decides)
    compute_dtype: str | None = field(default=None, metadata={"setting": True})
    num_shards_total: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["encoding"] is None:
            del d["encoding"]  # the writer picks the target kind's default
        if d["hidden_states"] is None:
            del d["hidden_states"]  # a store without hidden states has the header it always had
        if d["compute_dtype"] is None:
            del d["compute_dtype"]
        return d


# Header keys that must match to resume a store: StoreHeader's settings, and the format version.
SETTINGS_KEYS = ("format_version",) + tuple(f.name for f in fields(StoreHeader) if f.metadata.get("setting"))
# Settings added after stores were written without them: compared on resume only when the existing
# store records them (an older store resumes as before)
LATER_SETTINGS = ("compute_dtype",)
# Teacher fields compared on resume: where the teacher lives may change, what it is may not
# (served_model: the model id an HTTP teacher lists at /v1/models; None for local teachers).
TEACHER_IDENTITY_KEYS = ("weights_sha256", "vocab_size", "tokenizer_sha256", "chat_template_sha256", "served_model")

# Lossy encoding of topk_logprobs (topk / sampled stores). BitRound keeps this many explicit mantissa
# bits of each float32 (relative error <= 2**-(bits+1)); -inf survives.
LOGPROB_MANTISSA_BITS = 5


class StoreError(RuntimeError):
    """A store that cannot be read or written as asked; the message names the store and the part."""


class StoreSettingsMismatch(StoreError):
    """An existing store was written with other settings (teacher, data, targets...): resume refused."""


def target_width(header: dict[str, Any]) -> int:
    """Columns of the [T, K] target arrays: top_k, or head + draws for headtail stores."""
    k = int(header["top_k"])
    if header.get("targets") == "headtail":
        k += int(header["target_sampling"]["draws"])
    return k


def draw_logprobs_stored(header: dict[str, Any]) -> bool:
    """False for a headtail store written with ``--no-draw-logprobs`` (only the exact entries' logprobs)."""
    return (header.get("target_sampling") or {}).get("draw_logprobs", True) is not False


def headtail_draw_flags(header: dict[str, Any]) -> list[str]:
    """The ``kdship cache`` flags that draw as this headtail store's draws were drawn, every one spelled
    out (a later change of kdship's defaults cannot change what they mean); [] for other target kinds."""
    ts = header.get("target_sampling") or {}
    if header.get("targets") != "headtail" or "draws" not in ts:
        return []
    flags = ["--draws", str(ts["draws"]), "--certain-exact" if ts.get("certain_exact") else "--no-certain-exact",
             "--no-draw-logprobs" if ts.get("draw_logprobs") is False else "--draw-logprobs"]
    if "draw_power" in ts:
        flags += ["--draw-power", str(ts["draw_power"])]
    flags += ["--far-oversample", str(ts.get("far_oversample", 1))]  # absent: written before stratified draws, plain
    if "far_oversample" in ts:
        flags += ["--far-draws", str(ts["far_draws"])]
    return flags


def recache_command(header: dict[str, Any], out: str, *flags: str) -> str:
    """The ``kdship cache`` command that writes a store like the one ``header`` describes -- same teacher,
    data (its file name: the header records no path), mode, target kind, head, candidates, length limit,
    seed and generation settings -- with ``flags`` added: how a refusal spells out its fix."""
    import shlex

    ts = header.get("target_sampling") or {}
    cmd = ["kdship", "cache", str((header.get("teacher") or {}).get("name_or_path", "TEACHER")), str((header.get("data") or {}).get("name", "DATA")),
           "--out", out, "--mode", str(header.get("mode", "score")), "--targets", str(header.get("targets"))]
    if header.get("top_k") is not None:
        cmd += ["--top-k", str(header["top_k"])]
    if ts.get("exact"):
        cmd += ["--backend", "hf"]
    elif isinstance(ts.get("candidates"), int):
        cmd += ["--sampled-candidates", str(ts["candidates"])]
    if header.get("max_length") is not None:
        cmd += ["--max-length", str(header["max_length"]), "--overflow", str(header.get("overflow", "error"))]
    sampling = header.get("sampling") or {}
    seed = sampling.get("seed", ts.get("seed"))
    if seed is not None:
        cmd += ["--seed", str(seed)]
    for key, flag in (("samples", "--samples"), ("temperature", "--temperature"), ("top_p", "--top-p"), ("max_new_tokens", "--max-new-tokens")):
        if key in sampling:
            cmd += [flag, str(sampling[key])]
    return " ".join(shlex.quote(c) for c in cmd + list(flags))


def exact_entries_width(head: int, draws: int, certain_exact: bool) -> int:
    """The most exact entries a headtail row can hold: h, plus N - 1 certain draws with --certain-exact
    (the width of ``target_logprobs`` in a store without the draws' logprobs)."""
    return head + (draws - 1 if certain_exact else 0)


def logprob_width(header: dict[str, Any]) -> int:
    """Columns of ``target_logprobs``: the target width, or in a store without the draws' logprobs
    ``exact_entries_width``."""
    if header.get("targets") != "headtail" or draw_logprobs_stored(header):
        return target_width(header)
    ts = header["target_sampling"]
    return exact_entries_width(int(header["top_k"]), int(ts["draws"]), bool(ts.get("certain_exact")))


@dataclass
class Shard:
    """One shard's arrays, decoded.

    ``topk_ids`` / ``topk_logprobs`` / ``target_weights`` are what the trainer reads: for topk and
    sampled stores the stored arrays; for headtail stores a view derived from the stored ones by
    ``headtail_view`` (the exact entries with weight p, the draws with weight rest * count / draws, the
    data token appended when it is outside the head). An estimate of E_p[f] is sum_i w_i f(id_i) / p_i.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    sample_index: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    sample_hash: np.ndarray = field(default=None)  # type: ignore[assignment]
    target_weights: np.ndarray | None = None
    # [T, K] bool with target_weights: True where the entry is a draw (headtail's residual draws; every
    # entry of a sampled store), False where it is exact (headtail's head and data token)
    target_drawn: np.ndarray | None = None
    # headtail arrays (None in other stores)
    target_ids: np.ndarray | None = None
    target_logprobs: np.ndarray | None = None
    target_counts: np.ndarray | None = None
    token_logprob: np.ndarray | None = None
    rest_logmass: np.ndarray | None = None
    beyond_logmass: np.ndarray | None = None
    # teacher hidden states (optional; decoded only by readers that ask for them)
    hidden_states: np.ndarray | None = None
    hidden_scales: np.ndarray | None = None
    # [T, K+1] bool, only for a store without the draws' logprobs (after ``headtail_view``): True where
    # ``topk_logprobs`` is the teacher's; a draw's entry there holds its weight's log instead
    teacher_logprob_known: np.ndarray | None = None

    @property
    def targets(self) -> str:
        if self.target_ids is not None:
            return "headtail"
        return "sampled" if self.target_weights is not None else "topk"

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_positions(self) -> int:
        return int(self.offsets[-1])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """One sample's slices of the training view (+ ``target_weights`` for sampled / headtail)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.topk_ids is None:
            self.headtail_view()
        out = {
            "tokens": self.tokens[a:b],
            "loss_mask": self.loss_mask[a:b],
            "topk_ids": self.topk_ids[a:b],
            "topk_logprobs": self.topk_logprobs[a:b],
            "sample_index": int(self.sample_index[i]),
        }
        if self.target_weights is not None:
            out["target_weights"] = self.target_weights[a:b]
        if self.teacher_logprob_known is not None:
            out["teacher_logprob_known"] = self.teacher_logprob_known[a:b]
        return out

    @property
    def draw_logprobs(self) -> bool:
        """False when the headtail arrays hold only the exact entries' logprobs (``--no-draw-logprobs``)."""
        return self.target_logprobs is None or self.target_ids is None or self.target_logprobs.shape[1] == self.target_ids.shape[1]

    def headtail_view(self, draw_power: float = 1.0) -> "Shard":
        """Fill topk_ids / topk_logprobs / target_weights [T, K+1] from the headtail arrays.

        Columns: the K stored entries, then the data token (tokens[j]) when it is outside the head.
        Weights: exact (count 0) entries p_i; drawn entries (R - B) * count_i / sum(count) with R the
        stored rest mass and B the mass beyond the backend's candidates (the draws estimate the
        candidates' share of the residual). Rows sum to 1 - B up to the encoding; the loss gives the
        missing B to one bucket (``kdship.train.losses``).

        A store without the draws' logprobs (``--no-draw-logprobs``) holds the exact entries' logprobs
        packed left; a draw's ``topk_logprobs`` is then the log of its weight (so fkl's per-entry term
        w (log w - log q) has the gradient of w (log p - log q)) and ``teacher_logprob_known`` says
        which entries hold the teacher's logprob.
        """
        ids, cnt = self.target_ids, self.target_counts
        T = len(ids)
        valid = ids >= 0
        exact = valid & (cnt == 0)
        drawn = valid & (cnt > 0)
        if self.draw_logprobs:
            lps = self.target_logprobs.astype(np.float64)
        else:  # the k-th exact entry of a row has the row's k-th packed logprob
            packed = self.target_logprobs.astype(np.float64)
            slot = np.clip(np.cumsum(exact, 1) - 1, 0, max(packed.shape[1] - 1, 0))
            lps = np.where(exact, np.take_along_axis(packed, slot, 1), 0.0) if packed.shape[1] else np.zeros(ids.shape)
        n_draws = cnt.sum(1, dtype=np.int64)
        rest = np.exp(self.rest_logmass.astype(np.float64))
        if self.beyond_logmass is not None:  # at or below the encoding's floor: nothing beyond
            bl = self.beyond_logmass.astype(np.float64)
            rest = np.maximum(rest - np.where(bl > REST_FLOOR, np.exp(bl), 0.0), 0.0)
        w = np.where(exact, np.exp(lps), 0.0)
        if draw_power == 1.0:
            w += np.where(drawn, (rest / np.maximum(n_draws, 1))[:, None] * cnt, 0.0)
        else:  # draws from r ** a: weights count * p ** (1 - a), self-normalised to the row's R - B
            u = np.where(drawn, cnt * np.exp((1.0 - draw_power) * lps), 0.0)  # lps >= the -32 floor: no underflow
            w += rest[:, None] * u / np.maximum(u.sum(1, keepdims=True), 1e-300)
        if not self.draw_logprobs:
            lps = np.where(drawn, np.log(np.where(drawn & (w > 0), w, 1.0)), lps)
        tok = self.tokens.astype(np.int64)
        tok_in_head = (exact & (ids == tok[:, None])).any(1)
        has = valid.any(1)
        tok_col = has & ~tok_in_head
        self.topk_ids = np.concatenate([ids, np.where(tok_col, tok, NO_TARGET_ID)[:, None]], 1).astype(np.int32)
        lp_all = np.concatenate([np.where(valid, lps, -np.inf), np.where(tok_col, self.token_logprob, -np.inf)[:, None]], 1)
        self.topk_logprobs = lp_all.astype(np.float32)
        w_tok = np.where(tok_col, np.exp(self.token_logprob.astype(np.float64)), 0.0)
        self.target_weights = np.concatenate([w, w_tok[:, None]], 1).astype(np.float32)
        self.target_drawn = np.concatenate([drawn, np.zeros((T, 1), bool)], 1)
        if not self.draw_logprobs:
            self.teacher_logprob_known = ~self.target_drawn
        assert self.topk_ids.shape == (T, ids.shape[1] + 1)
        return self

    @classmethod
    def build(cls, samples: list[dict[str, Any]], top_k: int, with_target_weights: bool = False, targets: str | None = None,
              lp_width: int | None = None) -> "Shard":
        """Concatenate per-sample dicts: tokens, loss_mask, sample_index and the target arrays of the
        kind (``targets``; default "sampled" if ``with_target_weights`` else "topk"); ``top_k`` is the
        [T, K] arrays' width (``target_width`` of the header), ``lp_width`` that of ``target_logprobs``
        (``logprob_width``; default ``top_k``)."""
        lp_width = top_k if lp_width is None else lp_width
        kind = targets or ("sampled" if with_target_weights else "topk")
        if kind not in TARGET_KINDS:
            raise StoreError(f"unknown target kind {kind!r}; known: {', '.join(TARGET_KINDS)}")
        lengths = [len(s["tokens"]) for s in samples]
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths) if samples else []

        def cat(name: str, dtype: str, width: int | None) -> np.ndarray:
            shape = (-1, width) if width else (-1,)
            if not samples:
                return np.zeros((0, width) if width else (0,), dtype)
            return np.concatenate([np.asarray(s[name], dtype=dtype).reshape(shape) for s in samples])

        arrays: dict[str, Any] = {
            "tokens": cat("tokens", "int32", None),
            "loss_mask": cat("loss_mask", "bool", None),
        }
        for name, dtype in TARGET_ARRAY_DTYPES[kind].items():
            if name == "beyond_logmass" and samples and name not in samples[0]:  # nothing beyond: hf backend, tests
                arrays[name] = np.full(len(arrays["tokens"]), -np.inf, np.float32)
                continue
            arrays[name] = cat(name, dtype, None if name in _ROW_ARRAYS else (lp_width if name == "target_logprobs" else top_k))
        if samples and "hidden_states" in samples[0]:  # float32 [L_i, layers, D] per sample, projected
            hid = np.concatenate([np.asarray(s["hidden_states"], np.float32) for s in samples])
            arrays["hidden_states"], arrays["hidden_scales"] = quantize_hidden(hid)
        shard = cls(offsets=offsets, sample_index=np.asarray([s["sample_index"] for s in samples], dtype=np.int64), **arrays)
        shard.sample_hash = np.stack([sample_hash(shard.tokens[offsets[i] : offsets[i + 1]]) for i in range(len(samples))]) if samples else np.zeros((0, HASH_BYTES), np.uint8)
        shard.validate(top_k, lp_width)
        return shard

    def has_target(self) -> np.ndarray:
        """[T] bool: rows that hold a teacher target (not row 0, not unscored prompt rows)."""
        ids = self.target_ids if self.target_ids is not None else self.topk_ids
        return ids[:, 0] >= 0 if ids.shape[1] else np.zeros(len(ids), bool)

    def stored_arrays(self) -> dict[str, str]:
        """Name -> dtype of the arrays this shard writes (and its checksum covers), in order."""
        return {**BASE_ARRAY_DTYPES, **TARGET_ARRAY_DTYPES[self.targets]}

    def validate(self, top_k: int, lp_width: int | None = None) -> None:
        T, S = self.num_positions, self.num_samples
        expect = {"tokens": (T,), "offsets": (S + 1,), "sample_index": (S,), "sample_hash": (S, HASH_BYTES), "loss_mask": (T,)}
        for name in TARGET_ARRAY_DTYPES[self.targets]:
            expect[name] = (T,) if name in _ROW_ARRAYS else (T, lp_width if name == "target_logprobs" and lp_width is not None else top_k)
        for name, shape in expect.items():
            arr = getattr(self, name)
            if arr is None or tuple(arr.shape) != shape:
                raise StoreError(f"shard array {name!r} has shape {None if arr is None else tuple(arr.shape)}, expected {shape}")
        if self.hidden_states is not None:
            hs, sc = self.hidden_states, self.hidden_scales
            if hs.ndim != 3 or hs.shape[0] != T or sc is None or tuple(sc.shape) != hs.shape[:2]:
                raise StoreError(f"shard hidden_states {hs.shape} / hidden_scales {None if sc is None else sc.shape}: expected [{T}, L, D] / [{T}, L]")
        if self.targets == "headtail":
            ids = self.target_ids
            valid = ids >= 0
            # padding only at the end of a row, ids ascending and distinct before it
            if (valid[:, 1:] & ~valid[:, :-1]).any():
                raise StoreError("headtail target_ids: padding (-1) must come after a row's ids")
            if ((np.diff(ids, axis=1) <= 0) & valid[:, 1:]).any():
                raise StoreError("headtail target_ids: each row's ids must be distinct and ascending")


def teacher_entries(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A sample's stored (ids, logprobs) [L, K] where the logprob is the teacher's; id -1 / -inf elsewhere
    (a store written with --no-draw-logprobs holds its draws' weights, not their logprobs). A row has
    a target when any id is >= 0."""
    ids, lps = sample["topk_ids"], sample["topk_logprobs"]
    known = sample.get("teacher_logprob_known")
    if known is None:
        return ids, lps
    return np.where(known, ids, NO_TARGET_ID).astype(ids.dtype), np.where(known, lps, -np.inf).astype(lps.dtype)


def sample_hash(tokens: np.ndarray) -> np.ndarray:
    """Content hash of one sample's tokens (blake2b, 16 bytes), stable across re-packing."""
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<i4").tobytes(), digest_size=HASH_BYTES).digest()
    return np.frombuffer(digest, dtype=np.uint8).copy()


def shard_checksum(shard: Shard) -> str:
    """sha256 over the decoded arrays in a fixed order (little-endian bytes)."""
    h = hashlib.sha256()
    for name, dtype in shard.stored_arrays().items():
        arr = np.ascontiguousarray(getattr(shard, name), dtype=np.dtype(dtype).newbyteorder("<"))
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def hidden_checksum(shard: Shard) -> str:
    """sha256 over the hidden arrays, as ``shard_checksum`` does over the others."""
    h = hashlib.sha256()
    for name, dtype in HIDDEN_ARRAY_DTYPES.items():
        arr = np.ascontiguousarray(getattr(shard, name), dtype=np.dtype(dtype).newbyteorder("<"))
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def quantize_hidden(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [T, L, D] -> int8 codes [T, L, D] and float16 scales [T, L]: each (row, layer) vector
    scaled by its largest |value| / 127 (cache/FORMAT.md measures this against fp16)."""
    x = np.asarray(x, np.float32)
    scale = (np.abs(x).max(-1) / HIDDEN_QMAX).astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    codes = np.where(s32 > 0, np.rint(x / np.where(s32 > 0, s32, 1.0)), 0.0)
    return np.clip(codes, -HIDDEN_QMAX, HIDDEN_QMAX).astype(np.int8), scale


def dequantize_hidden(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The stored projected hidden states as float32: codes * scale."""
    return codes.astype(np.float32) * scales.astype(np.float32)[..., None]


@dataclass
class HiddenProjection:
    """The store's projection of the teacher's hidden states (one per stored layer, PCA).

    ``mean`` [L, H], ``components`` [L, D, H] with orthonormal rows: stored = (h - mean) @ components^T,
    and h ~ stored @ components + mean (exact up to the encoding when D = H). ``variance`` [L, D]: each
    component's variance over the rows it was fitted on (the trainer's MSE is relative to its sum).
    """

    layers: list[int]
    mean: np.ndarray
    components: np.ndarray
    variance: np.ndarray

    def project(self, h: np.ndarray) -> np.ndarray:
        """[N, L, H] hidden states -> [N, L, D]."""
        return np.einsum("nlh,ldh->nld", np.asarray(h, np.float32) - self.mean[None], self.components).astype(np.float32)

    def reconstruct(self, y: np.ndarray) -> np.ndarray:
        """[N, L, D] stored values -> [N, L, H] (the hidden states' part inside the D components)."""
        return (np.einsum("nld,ldh->nlh", np.asarray(y, np.float32), self.components) + self.mean[None]).astype(np.float32)


def read_projection(root: zarr.Group, header: dict[str, Any]) -> HiddenProjection | None:
    """The projection stored in a store's root group, or None (no hidden states, or not yet written)."""
    spec = header.get("hidden_states")
    if not spec or PROJECTION_GROUP not in root:
        return None
    g = root[PROJECTION_GROUP]
    return HiddenProjection(list(spec["layers"]), *(np.asarray(g[name][...], np.float32) for name in PROJECTION_ARRAY_DTYPES))


def shard_path(index: int) -> str:
    return f"{SHARDS_GROUP}/s{index:06d}"


def shard_index_of(path: str) -> int:
    return int(path.rsplit("/s", 1)[1])


def default_encoding(targets: str = "topk", vocab_size: int | None = None) -> dict[str, Any]:
    """The header's ``encoding`` for a new store of the given target kind (cache/FORMAT.md)."""
    if targets == "headtail":
        small = vocab_size is not None and vocab_size < UINT16_PAD
        return {
            "target_ids": {"order": "ascending", "filter": "delta", "dtype": "uint16" if small else "int32", "pad": UINT16_PAD if small else NO_TARGET_ID},
            "logprobs": {"fixed_scale": LOGPROB_SCALE, "dtype": "int16", "floor": LOGPROB_FLOOR},
            "rest_logmass": {"fixed_scale": REST_SCALE, "dtype": "int16", "floor": REST_FLOOR},
            "compressor": f"blosc-zstd-{HEADTAIL_CLEVEL}",
            "clevel": HEADTAIL_CLEVEL,
        }
    return {"topk_logprobs": {"bitround_keepbits": LOGPROB_MANTISSA_BITS}, "compressor": "blosc-zstd-bitshuffle-5"}


# headtail arrays stored as fixed-point logprobs (float32 at the zarr level, int16 inside) -> their spec
_FIXED_POINT_ARRAYS = {"target_logprobs": "logprobs", "token_logprob": "logprobs", "rest_logmass": "rest_logmass", "beyond_logmass": "rest_logmass"}
# [T] arrays of a target kind (the others are [T, K])
_ROW_ARRAYS = ("token_logprob", "rest_logmass", "beyond_logmass")


def encode_for_write(name: str, data: np.ndarray, encoding: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The array as it is handed to zarr (physical dtype), e.g. headtail ids as uint16 with padding
    65535, fixed-point logprobs clamped to the floor with padding 0. Inverse: ``decode_after_read``."""
    if name == "target_ids":
        spec = encoding["target_ids"]
        if spec["dtype"] == "uint16":
            return np.where(data < 0, UINT16_PAD, data).astype(np.uint16), "uint16"
        return data.astype(np.int32), "int32"
    if name in _FIXED_POINT_ARRAYS and _FIXED_POINT_ARRAYS[name] in encoding:
        floor = float(encoding[_FIXED_POINT_ARRAYS[name]]["floor"])
        x = np.where(np.isfinite(data), np.clip(data, floor, 0.0), np.where(data > 0, 0.0, floor if name in ("rest_logmass", "beyond_logmass") else 0.0))
        return x.astype(np.float32), "float32"
    return data, str(data.dtype)


def decode_after_read(name: str, arr: np.ndarray) -> np.ndarray:
    if name == "target_ids" and arr.dtype == np.uint16:
        return np.where(arr == UINT16_PAD, NO_TARGET_ID, arr.astype(np.int32)).astype(np.int32)
    return arr


# --------------------------------------------------------------------------------------------------
# Low-level access shared by writer and reader


def _is_url(url: str) -> bool:
    return "://" in str(url)


def _open_root(url: str, mode: str) -> zarr.Group:
    """Open the store's root group; ``url`` may be a path or an fsspec URL (``file://``, ``s3://``...)."""
    url = str(url)
    if _is_url(url) and _local_path(url) is None:
        store = zarr.storage.FsspecStore.from_url(url, read_only=(mode == "r"))
        return zarr.open_group(store=store, mode=mode, zarr_format=3)
    # local paths and file:// URLs: zarr's LocalStore writes every file atomically (temp + rename),
    # which the crash-safe commit of zarr.json relies on
    path = _local_path(url) if _is_url(url) else url
    return zarr.open_group(path, mode=mode, zarr_format=3)


def _create_root(url: str, header: dict[str, Any]) -> zarr.Group:
    """Create the root group with its header in one write of ``zarr.json`` (another writer never sees
    a root without a header); an existing root is opened as it is."""
    url = str(url)
    if _is_url(url) and _local_path(url) is None:
        store: Any = zarr.storage.FsspecStore.from_url(url, read_only=False)
    else:
        store = _local_path(url) if _is_url(url) else url
    try:
        return zarr.create_group(store=store, attributes={HEADER_ATTR: header}, zarr_format=3, overwrite=False)
    except zarr.errors.ContainsGroupError:
        return zarr.open_group(store=store, mode="r+", zarr_format=3)


def _shards_group(root: zarr.Group) -> zarr.Group:
    """The ``shards`` group, created if missing (another writer may create it at the same moment)."""
    try:
        return root.require_group(SHARDS_GROUP)
    except zarr.errors.ContainsGroupError:
        return root[SHARDS_GROUP]


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def _local_path(url: str) -> str | None:
    fs, path = _fs(url)
    return path if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else None


def store_exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


def _commit_record_path(base: str, shard: str) -> str:
    return f"{base}/{COMMITS_DIR}/{shard.rsplit('/', 1)[1]}.json"


def committed_shards(fs, base: str, header: dict[str, Any]) -> list[str]:
    """The committed shard paths, in shard order: one per commit record under ``commits/``, plus the
    header's ``complete_shards`` (a snapshot in stores written since records exist, the whole list in
    earlier ones). The listing bypasses fsspec's directory cache: other writers add records."""
    d = f"{base}/{COMMITS_DIR}"
    fs.invalidate_cache(d)
    try:
        names = [str(e).rsplit("/", 1)[1] for e in fs.ls(d, detail=False)]
    except FileNotFoundError:
        names = []
    found = {f"{SHARDS_GROUP}/{n[: -len('.json')]}" for n in names if n.endswith(".json") and n.startswith("s")}
    return sorted(found | set(header.get("complete_shards", [])), key=shard_index_of)


def _compressor(clevel: int = 5, shuffle: str = "bitshuffle") -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=clevel, shuffle=BloscShuffle.bitshuffle if shuffle == "bitshuffle" else BloscShuffle.shuffle)


def _array_codec_kwargs(name: str, encoding: dict[str, Any], dtype: str = "int32") -> dict[str, Any]:
    """Codecs of one array from the header's ``encoding`` (only standard zarr / numcodecs codecs, so
    a plain ``zarr.open`` decodes everything):

    * ``compressor``: blosc zstd (``clevel`` from ``encoding["clevel"]``, default 5), bit-shuffle except
      for delta-coded ids (byte-shuffle measured smaller there);
    * ``topk_logprobs.bitround_keepbits``: numcodecs BitRound filter (lossy; -inf survives);
    * headtail: ``target_ids`` numcodecs Delta (rows sorted ascending, so deltas are small); the
      fixed-point logprob arrays numcodecs FixedScaleOffset (float32 <-> int16, 1/scale nat steps);
    * ``transpose_topk``: the zarr ``transpose`` codec stores [T, K] arrays column-major.
    """
    from zarr.codecs import numcodecs as ncz

    clevel = int(encoding.get("clevel", 5))
    filters: list[Any] = []
    shuffle = "bitshuffle"
    if name in ("topk_ids", "topk_logprobs", "target_weights") and encoding.get("transpose_topk"):
        from zarr.codecs import TransposeCodec

        filters.append(TransposeCodec(order=(1, 0)))
    if name == "topk_logprobs":
        bits = encoding.get("topk_logprobs", {}).get("bitround_keepbits")
        if bits is not None:
            filters.append(ncz.BitRound(keepbits=int(bits)))
    if name == "target_ids" and encoding.get("target_ids", {}).get("filter") == "delta":
        filters.append(ncz.Delta(dtype=dtype))
        shuffle = "shuffle"
    if name in _FIXED_POINT_ARRAYS and _FIXED_POINT_ARRAYS[name] in encoding:
        spec = encoding[_FIXED_POINT_ARRAYS[name]]
        filters.append(ncz.FixedScaleOffset(offset=0, scale=int(spec["fixed_scale"]), dtype="<f4", astype="<i2"))
    kw: dict[str, Any] = {"compressors": [_compressor(clevel, shuffle)]}
    if filters:
        kw["filters"] = filters
    return kw


def _read_header(root: zarr.Group, url: str) -> dict[str, Any]:
    header = root.attrs.get(HEADER_ATTR)
    if not isinstance(header, dict):
        raise StoreError(f"{url}: not a kdship store (root attribute {HEADER_ATTR!r} missing)")
    version = header.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise StoreError(
            f"{url}: store format_version {version!r}; this kdship ({__version__}) reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))} (cache/FORMAT.md). Re-cache it with this kdship."
        )
    return dict(header)


# --------------------------------------------------------------------------------------------------
# Writer


class StoreWriter:
    """Creates or re-opens a store and commits shards one at a time.

    ``header`` holds the settings (see ``SETTINGS_KEYS``); the writer adds ``format_version``,
    ``complete_shards`` and ``kdship_version``. Re-opening an existing store with different settings
    raises ``StoreError`` naming the differing keys, unless ``overwrite`` (which deletes the store).
    Several processes may write disjoint shards of one *local* store at once: commits take a lock.
    """

    def __init__(self, url: str, header: "StoreHeader | dict[str, Any]", overwrite: bool = False, resume: bool = True):
        self.url = str(url)
        header = header.to_dict() if isinstance(header, StoreHeader) else dict(header)
        header["format_version"] = FORMAT_VERSION
        header.setdefault("encoding", default_encoding(header.get("targets") or "topk", (header.get("teacher") or {}).get("vocab_size")))
        self.top_k = target_width(header)
        self.lp_width = logprob_width(header)
        self.encoding = header["encoding"]
        fs, path = _fs(self.url)
        self._fs, self._path = fs, path.rstrip("/")
        if store_exists(self.url):
            if overwrite:
                fs.rm(self._path, recursive=True)
            else:
                root = _open_root(self.url, "r+")
                old = _read_header(root, self.url)
                diff = _differing_settings(old, header)
                if diff:
                    detail = "; ".join(_describe_difference(old, header, k) for k in diff)
                    raise StoreSettingsMismatch(
                        f"{self.url}: an existing store was written with different settings ({detail}). "
                        "Use --overwrite to replace it, or --out for a new store."
                    )
                if not resume:
                    raise StoreError(f"{self.url}: store exists; pass --resume to continue it or --overwrite to replace it")
                self.root = root
                self.header = old
                return
        elif fs.exists(self._path) and not overwrite:
            fs.invalidate_cache(self._path)
            entries = [str(e).rsplit("/", 1)[-1] for e in fs.ls(self._path, detail=False)]
            if "zarr.json" not in entries and [e for e in entries if e != LOCK_FILE]:
                raise StoreError(f"{self.url}: exists and is not a kdship store; refusing to write into it")
        header["kdship_version"] = __version__
        with self._lock():
            # another process may create it at the same moment: keep theirs if the settings agree
            self.root = _create_root(self.url, header)
            _shards_group(self.root)
        self.header = self._fresh_header()
        diff = _differing_settings(self.header, header)
        if diff:  # another process created the store first, with other settings
            raise StoreError(f"{self.url}: created concurrently with different settings ({', '.join(diff)})")

    # -- locking: a local lock file serialises header writes on local disk. Commits need no lock (one
    # record per shard), and on object stores the header is written only when the store is created
    # and when it is complete (both idempotent), so concurrent writers there are safe without one.
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        local = _local_path(self.url)
        if local is None:
            yield
            return
        os.makedirs(local, exist_ok=True)
        with open(os.path.join(local, LOCK_FILE), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _fresh_header(self) -> dict[str, Any]:
        root = _open_root(self.url, "r")
        return dict(root.attrs[HEADER_ATTR])

    @property
    def is_local(self) -> bool:
        """A local path or file:// URL (a lock file serialises header and projection writes)."""
        return _local_path(self.url) is not None

    def committed(self) -> list[str]:
        return committed_shards(self._fs, self._path, self._fresh_header())

    def is_committed(self, index: int) -> bool:
        return shard_path(index) in self.committed()

    def write_shard(self, index: int, shard: Shard, rejects: list[dict[str, Any]] | None = None, extra_attrs: dict | None = None) -> None:
        """Write shard ``index`` completely, verify it, then commit it (atomically)."""
        shard.validate(self.top_k, self.lp_width)
        path = shard_path(index)
        if path in self.committed():
            raise StoreError(f"{self.url}: shard {path} is already committed")
        shards = _shards_group(self.root)
        name = path.split("/", 1)[1]
        if name in shards:  # leftovers of a killed run: never committed, so redo from scratch
            del shards[name]
        self._check_hidden(shard)
        g = shards.create_group(name)
        for arr_name, dtype in shard.stored_arrays().items():
            data, dtype = encode_for_write(arr_name, np.asarray(getattr(shard, arr_name), dtype=dtype), self.encoding)
            _write_array(g, arr_name, data, **_array_codec_kwargs(arr_name, self.encoding, dtype))
        if shard.hidden_states is not None:
            clevel = int(self.header["hidden_states"]["encoding"].get("clevel", 5))
            for arr_name, dtype in HIDDEN_ARRAY_DTYPES.items():
                _write_array(g, arr_name, np.asarray(getattr(shard, arr_name), dtype=dtype), compressors=[_compressor(clevel)])
        # checksum over what a reader will decode (the logprob encoding is lossy)
        decoded = read_shard_arrays(g, with_hidden=shard.hidden_states is not None)
        attrs = {
            "checksum_sha256": shard_checksum(decoded),
            "num_samples": shard.num_samples,
            "num_positions": shard.num_positions,
            "rejects": list(rejects or []),
        }
        if shard.hidden_states is not None:
            attrs["hidden_checksum_sha256"] = hidden_checksum(decoded)
        if extra_attrs:
            attrs.update(extra_attrs)
        g.update_attributes(attrs)  # one write of the group's zarr.json, not one per key
        self._commit(path, attrs)

    def _check_hidden(self, shard: Shard) -> None:
        """A store with hidden states needs them in every shard, with the header's layers and dim."""
        spec = self.header.get("hidden_states")
        if spec is None and shard.hidden_states is not None:
            raise StoreError(f"{self.url}: the shard has hidden states but the store's header declares none")
        if spec is not None:
            want = (len(spec["layers"]), int(spec["dim"]))
            if shard.hidden_states is None and shard.num_positions == 0:  # every sample rejected: nothing to hold
                shard.hidden_states, shard.hidden_scales = np.zeros((0,) + want, np.int8), np.zeros((0, want[0]), np.float16)
            got = None if shard.hidden_states is None else tuple(shard.hidden_states.shape[1:])
            if got != want:
                raise StoreError(f"{self.url}: shard hidden states of shape [T, *{got}], the header declares [T, *{want}] (layers, dim)")

    def projection(self) -> HiddenProjection | None:
        return read_projection(_open_root(self.url, "r"), self.header)

    def ensure_projection(self, fit: "Callable[[], HiddenProjection]") -> HiddenProjection:
        """The store's projection: the stored one (a resumed run, another process), or ``fit()``
        written once, under the lock, before any shard uses it; every shard uses the same one."""
        with self._lock():
            stored = self.projection()
            if stored is not None:
                return stored
            proj = fit()
            spec = self.header["hidden_states"]
            want = (len(spec["layers"]), int(spec["dim"]), int(spec["hidden_size"]))
            if proj.components.shape != want or proj.mean.shape != want[::2]:
                raise StoreError(f"{self.url}: projection of shape {proj.components.shape}, the header declares {want} (layers, dim, hidden size)")
            root = _open_root(self.url, "r+")
            partial = f"{PROJECTION_GROUP}.partial"  # written, then renamed: no half projection is ever read
            if partial in root:
                del root[partial]
            g = root.create_group(partial)
            for name, dtype in PROJECTION_ARRAY_DTYPES.items():
                _write_array(g, name, np.asarray(getattr(proj, name), dtype=dtype), chunk_rows=len(proj.layers), compressors=[_compressor()])
            self._fs.mv(f"{self._path}/{partial}", f"{self._path}/{PROJECTION_GROUP}", recursive=True)
            return self.projection()

    def _commit(self, path: str, attrs: dict[str, Any]) -> None:
        """Write the shard's commit record: one new object, whole or absent (see the module docstring)."""
        header = self._fresh_header()
        diff = _differing_settings(header, self.header)
        if diff:  # another writer re-created the store with other settings while this shard was written
            raise StoreSettingsMismatch(f"{self.url}: the store's settings changed while shard {path} was written ({', '.join(diff)}); not committed")
        record = {"shard": path, "checksum_sha256": attrs["checksum_sha256"], "num_samples": attrs["num_samples"],
                  "num_positions": attrs["num_positions"], "writer": f"{socket.gethostname()}:{os.getpid()}", "committed_at": time.time()}
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        target = _commit_record_path(self._path, path)
        local = _local_path(self.url)
        if local is not None:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.partial{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        else:
            self._fs.pipe_file(target, data)  # one PUT: object stores show a whole object or none

    def mark_complete(self, n_shards: int, **fields: Any) -> bool:
        """If all ``n_shards`` shards are committed, write ``complete`` and the ``complete_shards``
        snapshot (plus ``fields``) into the header; returns whether the store is complete."""
        done = self.committed()
        if len(done) < n_shards:
            return False
        self.update_header(complete=True, complete_shards=done, **fields)
        return True

    def update_header(self, **fields: Any) -> None:
        """Set non-settings header fields (e.g. ``complete``, ``summary``) under the lock."""
        with self._lock():
            root = _open_root(self.url, "r+")
            header = dict(root.attrs[HEADER_ATTR])
            header.update(fields)
            root.attrs[HEADER_ATTR] = header
            self.header = header

    def rebuild_rejects(self) -> int:
        """Rewrite STORE/rejects.jsonl from the committed shards' rejects; returns their count.

        The shard attributes are the source of truth (written before the commit), so the file is
        always rebuildable; it is replaced by a rename, under the lock, so readers never see half.
        """
        with self._lock():
            reader = StoreReader(self.url, verify=False)
            rows = [r for p in reader.shard_paths for r in reader.shard_attrs(p).get("rejects", [])]
            rows.sort(key=lambda r: (r.get("row", -1), r.get("sample", 0)))
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            target = f"{self._path}/{REJECTS_FILE}"
            tmp = f"{target}.partial{os.getpid()}"
            with self._fs.open(tmp, "w") as fh:
                fh.write(text)
            self._fs.mv(tmp, target)
        return len(rows)


def _differing_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings keys whose values differ between an existing store's header and a new one."""
    return [k for k in SETTINGS_KEYS if not (k in LATER_SETTINGS and k not in old) and _canon(_settings_value(old, k)) != _canon(_settings_value(new, k))]


def _settings_value(header: dict[str, Any], key: str) -> Any:
    v = header.get(key)
    if key == "teacher" and isinstance(v, dict):
        return {k: v.get(k) for k in TEACHER_IDENTITY_KEYS}
    return v


def _describe_difference(old: dict[str, Any], new: dict[str, Any], key: str) -> str:
    """One differing setting for an error message; for the teacher, the identity fields that differ."""
    a, b = _settings_value(old, key), _settings_value(new, key)
    if key == "teacher" and isinstance(a, dict) and isinstance(b, dict):
        return "; ".join(f"teacher {f}: store has {a.get(f)!r}, asked {b.get(f)!r}" for f in TEACHER_IDENTITY_KEYS if a.get(f) != b.get(f))
    return f"{key}: store has {old.get(key)!r}, asked {new.get(key)!r}"


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------------
# Reader


def _write_array(g: zarr.Group, name: str, data: np.ndarray, chunk_rows: int = CHUNK_POSITIONS, **codecs: Any) -> None:
    """One array of a group: ``chunk_rows`` rows per chunk, all chunks in one zarr shard file."""
    chunks = (chunk_rows,) + data.shape[1:] if data.ndim else data.shape
    chunks = tuple(max(1, c) for c in chunks)
    n_chunks = max(1, -(-data.shape[0] // chunks[0]))
    shards_shape = (n_chunks * chunks[0],) + chunks[1:]
    a = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards_shape, fill_value=0, **codecs)
    if data.size:
        a[...] = data


def read_shard_arrays(g: zarr.Group, with_hidden: bool = False) -> Shard:
    """A shard group's stored arrays, decoded (the kind is told by which target arrays exist); the
    hidden states too when ``with_hidden`` and the shard has them."""
    kind = "headtail" if "target_ids" in g else ("sampled" if "target_weights" in g else "topk")
    names = {**BASE_ARRAY_DTYPES, **TARGET_ARRAY_DTYPES[kind]}
    if with_hidden and "hidden_states" in g:
        names.update(HIDDEN_ARRAY_DTYPES)
    return Shard(**{name: decode_after_read(name, np.asarray(g[name][...])) for name in names})


class StoreReader:
    """Reads committed shards only. ``verify`` checks each shard's checksum the first time this reader
    reads it (committed shards are immutable; later epochs skip the ~30 % the sha256 costs)."""

    def __init__(self, url: str, verify: bool = True, with_hidden: bool = False):
        self.url = str(url)
        if not store_exists(self.url):
            raise StoreError(f"{self.url}: no kdship store here (no zarr.json)")
        self.root = _open_root(self.url, "r")
        self.header = _read_header(self.root, self.url)
        fs, path = _fs(self.url)
        self._shard_paths = committed_shards(fs, path.rstrip("/"), self.header)
        self.verify = verify
        self.with_hidden = with_hidden  # decode the teacher's hidden states too (hint KD)
        self._verified: set[str] = set()

    @property
    def hidden_states(self) -> dict[str, Any] | None:
        """The header's ``hidden_states`` spec (layers, dim, ...), or None: the store has none."""
        return self.header.get("hidden_states")

    def projection(self) -> HiddenProjection | None:
        return read_projection(self.root, self.header)

    @property
    def top_k(self) -> int:
        return int(self.header["top_k"])

    @property
    def shard_paths(self) -> list[str]:
        """The shards committed when this reader was opened, in shard order."""
        return list(self._shard_paths)

    @property
    def targets(self) -> str:
        """"headtail", "topk" or "sampled" (with headtail and sampled every Shard has ``target_weights``)."""
        return str(self.header.get("targets") or "topk")

    @property
    def target_width(self) -> int:
        """K of the stored [T, K] target arrays (the trainer's view adds one column for headtail)."""
        return target_width(self.header)

    @property
    def complete(self) -> bool:
        """Every shard committed: the header says so, or (writers that finished together may each
        have seen one record short) the records cover all ``num_shards_total`` shards."""
        total = self.header.get("num_shards_total")
        return bool(self.header.get("complete", False)) or (bool(total) and len(self._shard_paths) >= int(total))

    def shard_attrs(self, path: str) -> dict[str, Any]:
        return dict(self.root[path].attrs)

    def read_shard(self, path: str) -> Shard:
        if path not in self.shard_paths:
            raise StoreError(f"{self.url}: shard {path} is not committed")
        g = self.root[path]
        shard = read_shard_arrays(g, with_hidden=self.with_hidden)
        if self.verify and path not in self._verified:
            checks = [("checksum_sha256", shard_checksum)] + ([("hidden_checksum_sha256", hidden_checksum)] if shard.hidden_states is not None else [])
            for attr, checksum in checks:
                want, got = g.attrs.get(attr), checksum(shard)
                if want != got:
                    raise StoreError(f"{self.url}: shard {path} fails its {attr} (stored {want}, computed {got}); the store is corrupt")
            self._verified.add(path)
        if shard.targets == "headtail":
            shard.headtail_view(float((self.header.get("target_sampling") or {}).get("draw_power", 1.0)))
        return shard

    def iter_shards(self) -> Iterator[tuple[str, Shard]]:
        for p in self.shard_paths:
            yield p, self.read_shard(p)

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        for _, shard in self.iter_shards():
            for i in range(shard.num_samples):
                yield shard.sample(i)

    def num_samples(self) -> int:
        return sum(int(self.shard_attrs(p)["num_samples"]) for p in self.shard_paths)

    def num_positions(self) -> int:
        return sum(int(self.shard_attrs(p)["num_positions"]) for p in self.shard_paths)

    def rejects(self) -> list[dict[str, Any]]:
        return [r for p in self.shard_paths for r in self.shard_attrs(p).get("rejects", [])]
