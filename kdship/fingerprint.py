"""What a model and its tokenizer are, as hashes: the teacher fingerprint a store records and every
reader checks (``kdship cache`` writes it; train, export and eval compare the student's tokenizer).

``weights_sha256`` streams the weight files once and caches the digest per (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


class FingerprintError(ValueError):
    pass


def chat_template_sha256(tok) -> str | None:
    t = getattr(tok, "chat_template", None)
    if not t:
        return None
    if isinstance(t, dict):
        t = json.dumps(t, sort_keys=True)
    return hashlib.sha256(t.encode()).hexdigest()



def tokenizer_sha256(tok) -> str:
    """sha256 of the token -> id map (added/special tokens included), sorted by id."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()




WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _fingerprint_cache() -> Path:
    home = os.environ.get("KDSHIP_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "kdship"
    return base / "weight_sha256.json"


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the weight files (name + bytes, sorted by name), streamed in 8 MiB blocks.

    Cached per file by (absolute path, size, mtime_ns) in ``~/.cache/kdship/weight_sha256.json``
    (``$KDSHIP_HOME`` if set), since hashing a large teacher takes a while.
    """
    d = Path(model_dir)
    files = sorted(f for f in d.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FingerprintError(f"{d}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    cache_file = _fingerprint_cache()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    total = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(8 << 20), b""):
                    h.update(block)
            digest = cache[key] = h.hexdigest()
            changed = True
        total.update(f.name.encode() + b"\0" + digest.encode())
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # the cache is an optimisation only
    return total.hexdigest()


def model_vocab_size(model_dir: str | Path) -> int | None:
    f = Path(model_dir) / "config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg["vocab_size"])


def _has_weights(d: Path) -> bool:
    return any(f.name.endswith(WEIGHT_SUFFIXES) for f in d.iterdir())


def teacher_fingerprint(teacher: str, tok) -> dict[str, Any]:
    d = Path(teacher)
    return {
        "name_or_path": str(d.resolve()) if d.exists() else teacher,
        "weights_sha256": weights_sha256(d) if d.is_dir() and _has_weights(d) else None,
        "vocab_size": model_vocab_size(d) if d.is_dir() else None,
        "tokenizer_sha256": tokenizer_sha256(tok),
        "chat_template_sha256": chat_template_sha256(tok),
    }
