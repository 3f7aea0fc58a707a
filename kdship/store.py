"""The teacher store, format v1: the one definition that the cache writer and every reader import.

A store is a Zarr v3 group (a local folder or an fsspec URL) documented in ``cache/FORMAT.md``::

    STORE/
      zarr.json                 root group; attribute "kdship" = the header (see ``Header``)
      shards/s000000/           one group per shard, written completely, then committed
        tokens        int32 [T]       the shard's samples, concatenated
        offsets       int64 [S+1]     sample i is tokens[offsets[i]:offsets[i+1]]
        sample_index  int64 [S]       the input row each sample came from
        sample_hash   uint8 [S, 16]   blake2b-128 of the sample's int32 tokens (joins with data)
        loss_mask     bool  [T]       positions the student is trained on (response / all text)
        topk_ids      int32 [T, K]    row j: teacher's top-k ids for token j given tokens < j
        topk_logprobs f32   [T, K]    their log-probabilities, sorted descending; -inf / id -1 pad
        target_weights f32  [T, K]    only in ``targets: sampled`` stores: empirical weight count/N
      rejects.jsonl             rows refused under --skip-bad, rebuilt from committed shards

Crash safety: a shard's arrays are written first, then its checksum (over the *decoded* arrays) is
stored in the shard group's attributes, and only then is the shard's path appended to the header's
``complete_shards`` -- one atomic write of the root ``zarr.json`` under a lock file. A shard that is
not listed does not exist as far as any reader is concerned; the writer deletes and redoes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import warnings

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from kdship import __version__

# BitRound is a numcodecs codec, which zarr-python decodes itself; its warning that other Zarr
# implementations may lack it is documented in cache/FORMAT.md, not repeated on every open.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

FORMAT_VERSION = 1
HEADER_ATTR = "kdship"
SHARDS_GROUP = "shards"
REJECTS_FILE = "rejects.jsonl"
LOCK_FILE = ".kdship.lock"

# Fixed array names and dtypes: other tools rely on them (cache/FORMAT.md).
ARRAY_DTYPES: dict[str, str] = {
    "tokens": "int32",
    "offsets": "int64",
    "sample_index": "int64",
    "sample_hash": "uint8",
    "loss_mask": "bool",
    "topk_ids": "int32",
    "topk_logprobs": "float32",
}
# Arrays that exist only in some stores: ``target_weights`` in ``targets: "sampled"`` stores
# (random-sampling KD): the weight of each stored id = times drawn / draws; 0 for padding.
OPTIONAL_ARRAY_DTYPES: dict[str, str] = {"target_weights": "float32"}
HASH_BYTES = 16
NO_TARGET_ID = -1  # with logprob -inf: row 0 of a sample, prompt rows that were not scored

# Positions per chunk along T. Each array of a shard is one zarr "shard" file holding its chunks,
# so a store has a handful of files per shard group, and a reader can still decode chunk by chunk.
# zarr-python spends ~0.5 ms of CPU per chunk outside the codec, so chunks are large: at 4096 the
# loader decoded 0.74 M positions per CPU-second, at 32768 1.2 M (bench/train_throughput.py).
CHUNK_POSITIONS = 32768

# Header keys that define what the targets mean. Re-opening a store with any of these different is
# refused (unless overwrite): targets cached under one teacher / template / k are wrong under another.
SETTINGS_KEYS = (
    "format_version",
    "mode",
    "top_k",
    "targets",
    "teacher",
    "sampling",
    "logprobs_mode",
    "max_length",
    "overflow",
    "data",
    "shard_size",
    "shard_positions",
    "encoding",
    "target_sampling",
    "filters",
)
# Teacher fields compared on resume: where the teacher lives may change, what it is may not.
TEACHER_IDENTITY_KEYS = ("weights_sha256", "vocab_size", "tokenizer_sha256", "chat_template_sha256")

# Lossy encoding of topk_logprobs. BitRound keeps this many explicit mantissa bits of each float32
# (relative error <= 2**-(bits+1)); -inf survives. The decoded values come back as float32 through
# zarr's own codec pipeline: a plain zarr.open(...)[...] gives them. The resulting KL error between
# the exact and the decoded top-k distributions is measured in bench/ and documented in FORMAT.md.
LOGPROB_MANTISSA_BITS = 5


class StoreError(RuntimeError):
    """A store that cannot be read or written as asked; the message names the store and the part."""


@dataclass
class Shard:
    """One shard's arrays, decoded. ``sample_hash`` is filled in by ``Shard.build``."""

    tokens: np.ndarray
    offsets: np.ndarray
    sample_index: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    sample_hash: np.ndarray = field(default=None)  # type: ignore[assignment]
    # [T, K] float32, only for ``targets: sampled`` stores (count / draws per stored id); else None
    target_weights: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_positions(self) -> int:
        return int(self.offsets[-1])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """One sample's slices; ``target_weights`` is included only in sampled-target stores."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        out = {
            "tokens": self.tokens[a:b],
            "loss_mask": self.loss_mask[a:b],
            "topk_ids": self.topk_ids[a:b],
            "topk_logprobs": self.topk_logprobs[a:b],
            "sample_index": int(self.sample_index[i]),
        }
        if self.target_weights is not None:
            out["target_weights"] = self.target_weights[a:b]
        return out

    @classmethod
    def build(cls, samples: list[dict[str, Any]], top_k: int, with_target_weights: bool = False) -> "Shard":
        """Concatenate per-sample dicts (tokens, loss_mask, topk_ids, topk_logprobs, sample_index
        and, when ``with_target_weights``, target_weights)."""
        lengths = [len(s["tokens"]) for s in samples]
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths) if samples else []
        if samples:
            tokens = np.concatenate([np.asarray(s["tokens"], dtype=np.int32) for s in samples])
            loss_mask = np.concatenate([np.asarray(s["loss_mask"], dtype=bool) for s in samples])
            ids = np.concatenate([np.asarray(s["topk_ids"], dtype=np.int32).reshape(-1, top_k) for s in samples])
            lps = np.concatenate([np.asarray(s["topk_logprobs"], dtype=np.float32).reshape(-1, top_k) for s in samples])
        else:
            tokens = np.zeros(0, np.int32)
            loss_mask = np.zeros(0, bool)
            ids = np.zeros((0, top_k), np.int32)
            lps = np.zeros((0, top_k), np.float32)
        shard = cls(
            tokens=tokens,
            offsets=offsets,
            sample_index=np.asarray([s["sample_index"] for s in samples], dtype=np.int64),
            loss_mask=loss_mask,
            topk_ids=ids,
            topk_logprobs=lps,
        )
        if with_target_weights:
            shard.target_weights = (
                np.concatenate([np.asarray(s["target_weights"], dtype=np.float32).reshape(-1, top_k) for s in samples])
                if samples
                else np.zeros((0, top_k), np.float32)
            )
        shard.sample_hash = np.stack([sample_hash(shard.tokens[offsets[i] : offsets[i + 1]]) for i in range(len(samples))]) if samples else np.zeros((0, HASH_BYTES), np.uint8)
        shard.validate(top_k)
        return shard

    def validate(self, top_k: int) -> None:
        T, S = self.num_positions, self.num_samples
        expect = {
            "tokens": (T,),
            "offsets": (S + 1,),
            "sample_index": (S,),
            "sample_hash": (S, HASH_BYTES),
            "loss_mask": (T,),
            "topk_ids": (T, top_k),
            "topk_logprobs": (T, top_k),
        }
        if self.target_weights is not None:
            expect["target_weights"] = (T, top_k)
        for name, shape in expect.items():
            arr = getattr(self, name)
            if tuple(arr.shape) != shape:
                raise StoreError(f"shard array {name!r} has shape {tuple(arr.shape)}, expected {shape}")


def sample_hash(tokens: np.ndarray) -> np.ndarray:
    """Content hash of one sample's tokens (blake2b, 16 bytes), stable across re-packing."""
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<i4").tobytes(), digest_size=HASH_BYTES).digest()
    return np.frombuffer(digest, dtype=np.uint8).copy()


def shard_checksum(shard: Shard) -> str:
    """sha256 over the decoded arrays in a fixed order (little-endian bytes)."""
    h = hashlib.sha256()
    for name, dtype in _present_arrays(shard).items():
        arr = np.ascontiguousarray(getattr(shard, name), dtype=np.dtype(dtype).newbyteorder("<"))
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _present_arrays(shard: Shard) -> dict[str, str]:
    out = dict(ARRAY_DTYPES)
    for name, dtype in OPTIONAL_ARRAY_DTYPES.items():
        if getattr(shard, name) is not None:
            out[name] = dtype
    return out


def shard_path(index: int) -> str:
    return f"{SHARDS_GROUP}/s{index:06d}"


def shard_index_of(path: str) -> int:
    return int(path.rsplit("/s", 1)[1])


def default_encoding() -> dict[str, Any]:
    return {"topk_logprobs": {"bitround_keepbits": LOGPROB_MANTISSA_BITS}, "compressor": "blosc-zstd-bitshuffle-5"}


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


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def _local_path(url: str) -> str | None:
    fs, path = _fs(url)
    return path if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else None


def store_exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


def _compressor(clevel: int = 5, shuffle: str = "bitshuffle") -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=clevel, shuffle=BloscShuffle.bitshuffle if shuffle == "bitshuffle" else BloscShuffle.shuffle)


def _array_codec_kwargs(name: str, encoding: dict[str, Any]) -> dict[str, Any]:
    """Codecs of one array from the header's ``encoding`` (only standard zarr / numcodecs codecs, so
    a plain ``zarr.open`` decodes everything):

    * ``compressor``: blosc zstd with bit-shuffle (``clevel`` from ``encoding["clevel"]``, default 5);
    * ``topk_logprobs.bitround_keepbits``: numcodecs BitRound filter (lossy; -inf survives);
    * ``transpose_topk``: the zarr ``transpose`` codec stores [T, K] arrays column-major, so that
      rank-j values of neighbouring positions sit together (they compress far better).
    """
    clevel = int(encoding.get("clevel", 5))
    kw: dict[str, Any] = {"compressors": [_compressor(clevel)]}
    filters: list[Any] = []
    if name in ("topk_ids", "topk_logprobs", "target_weights") and encoding.get("transpose_topk"):
        from zarr.codecs import TransposeCodec

        filters.append(TransposeCodec(order=(1, 0)))
    if name == "topk_logprobs":
        bits = encoding.get("topk_logprobs", {}).get("bitround_keepbits")
        if bits is not None:
            from zarr.codecs.numcodecs import BitRound

            filters.append(BitRound(keepbits=int(bits)))
    if filters:
        kw["filters"] = filters
    return kw


def _read_header(root: zarr.Group, url: str) -> dict[str, Any]:
    header = root.attrs.get(HEADER_ATTR)
    if not isinstance(header, dict):
        raise StoreError(f"{url}: not a kdship store (root attribute {HEADER_ATTR!r} missing)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{url}: store format_version {version!r}, this kdship reads {FORMAT_VERSION}")
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

    def __init__(self, url: str, header: dict[str, Any], overwrite: bool = False, resume: bool = True):
        self.url = str(url)
        header = dict(header)
        header["format_version"] = FORMAT_VERSION
        header.setdefault("encoding", default_encoding())
        self.top_k = int(header["top_k"])
        self.encoding = header["encoding"]
        fs, path = _fs(self.url)
        self._fs, self._path = fs, path.rstrip("/")
        if store_exists(self.url):
            if overwrite:
                fs.rm(self._path, recursive=True)
            else:
                root = _open_root(self.url, "r+")
                old = _read_header(root, self.url)
                diff = [k for k in SETTINGS_KEYS if _canon(_settings_value(old, k)) != _canon(_settings_value(header, k))]
                if diff:
                    detail = "; ".join(f"{k}: store has {old.get(k)!r}, asked {header.get(k)!r}" for k in diff)
                    raise StoreError(
                        f"{self.url}: an existing store was written with different settings ({detail}). "
                        "Use --overwrite to replace it, or --out for a new store."
                    )
                if not resume:
                    raise StoreError(f"{self.url}: store exists; pass --resume to continue it or --overwrite to replace it")
                self.root = root
                self.header = old
                return
        elif fs.exists(self._path) and not overwrite and [e for e in fs.ls(self._path, detail=False) if not str(e).endswith(LOCK_FILE)]:
            raise StoreError(f"{self.url}: exists and is not a kdship store; refusing to write into it")
        self.root = _open_root(self.url, "a")
        header["complete_shards"] = []
        header["kdship_version"] = __version__
        with self._lock():
            # another process may have created it first; keep theirs if the settings agree
            cur = self.root.attrs.get(HEADER_ATTR)
            if not cur:
                self.root.attrs[HEADER_ATTR] = header
            self.root.require_group(SHARDS_GROUP)
        self.header = self._fresh_header()
        diff = [k for k in SETTINGS_KEYS if _canon(_settings_value(self.header, k)) != _canon(_settings_value(header, k))]
        if diff:  # another process created the store first, with other settings
            raise StoreError(f"{self.url}: created concurrently with different settings ({', '.join(diff)})")

    # -- locking: a local lock file; on remote URLs a single writer is assumed -----------------------
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

    def committed(self) -> list[str]:
        return list(self._fresh_header().get("complete_shards", []))

    def is_committed(self, index: int) -> bool:
        return shard_path(index) in self.committed()

    def write_shard(self, index: int, shard: Shard, rejects: list[dict[str, Any]] | None = None, extra_attrs: dict | None = None) -> None:
        """Write shard ``index`` completely, verify it, then commit it (atomically)."""
        shard.validate(self.top_k)
        path = shard_path(index)
        if path in self.committed():
            raise StoreError(f"{self.url}: shard {path} is already committed")
        shards = self.root.require_group(SHARDS_GROUP)
        name = path.split("/", 1)[1]
        if name in shards:  # leftovers of a killed run: never committed, so redo from scratch
            del shards[name]
        g = shards.create_group(name)
        for arr_name, dtype in _present_arrays(shard).items():
            data = np.asarray(getattr(shard, arr_name), dtype=dtype)
            chunks = (CHUNK_POSITIONS,) + data.shape[1:] if data.ndim else data.shape
            chunks = tuple(max(1, c) for c in chunks)
            n_chunks = max(1, -(-data.shape[0] // chunks[0]))
            shards_shape = (n_chunks * chunks[0],) + chunks[1:]
            a = g.create_array(
                arr_name,
                shape=data.shape,
                dtype=dtype,
                chunks=chunks,
                shards=shards_shape,
                fill_value=0,
                **_array_codec_kwargs(arr_name, self.encoding),
            )
            if data.size:
                a[...] = data
        # checksum over what a reader will decode (the logprob encoding is lossy)
        decoded = read_shard_arrays(g)
        attrs = {
            "checksum_sha256": shard_checksum(decoded),
            "num_samples": shard.num_samples,
            "num_positions": shard.num_positions,
            "rejects": list(rejects or []),
        }
        if extra_attrs:
            attrs.update(extra_attrs)
        g.update_attributes(attrs)  # one write of the group's zarr.json, not one per key
        self._commit(path)

    def _commit(self, path: str) -> None:
        with self._lock():
            root = _open_root(self.url, "r+")
            header = dict(root.attrs[HEADER_ATTR])
            done = set(header.get("complete_shards", []))
            done.add(path)
            header["complete_shards"] = sorted(done, key=shard_index_of)
            root.attrs[HEADER_ATTR] = header  # one atomic write of zarr.json
            self.header = header

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


def _settings_value(header: dict[str, Any], key: str) -> Any:
    v = header.get(key)
    if key == "teacher" and isinstance(v, dict):
        return {k: v.get(k) for k in TEACHER_IDENTITY_KEYS}
    return v


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------------
# Reader


def read_shard_arrays(g: zarr.Group) -> Shard:
    arrays = {name: np.asarray(g[name][...]) for name in ARRAY_DTYPES}
    for name in OPTIONAL_ARRAY_DTYPES:
        arrays[name] = np.asarray(g[name][...]) if name in g else None
    return Shard(**arrays)


class StoreReader:
    """Reads committed shards only. ``verify`` checks each shard's checksum the first time this reader
    reads it (committed shards are immutable; later epochs skip the ~30 % the sha256 costs)."""

    def __init__(self, url: str, verify: bool = True):
        self.url = str(url)
        if not store_exists(self.url):
            raise StoreError(f"{self.url}: no kdship store here (no zarr.json)")
        self.root = _open_root(self.url, "r")
        self.header = _read_header(self.root, self.url)
        self.verify = verify
        self._verified: set[str] = set()

    @property
    def top_k(self) -> int:
        return int(self.header["top_k"])

    @property
    def shard_paths(self) -> list[str]:
        return list(self.header.get("complete_shards", []))

    @property
    def targets(self) -> str:
        """"topk" or "sampled" (then every Shard has ``target_weights``)."""
        return str(self.header.get("targets") or "topk")

    @property
    def complete(self) -> bool:
        return bool(self.header.get("complete", False))

    def shard_attrs(self, path: str) -> dict[str, Any]:
        return dict(self.root[path].attrs)

    def read_shard(self, path: str) -> Shard:
        if path not in self.shard_paths:
            raise StoreError(f"{self.url}: shard {path} is not committed")
        g = self.root[path]
        shard = read_shard_arrays(g)
        if self.verify and path not in self._verified:
            want = g.attrs.get("checksum_sha256")
            got = shard_checksum(shard)
            if want != got:
                raise StoreError(f"{self.url}: shard {path} fails its checksum (stored {want}, computed {got}); the store is corrupt")
            self._verified.add(path)
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
