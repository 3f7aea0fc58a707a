"""Input readers shared by ``kdship cache`` and ``kdship eval``: JSONL, Parquet, ``datasets`` folders.

Every input record becomes a validated ``Row``; a record that cannot be used (malformed JSON, a
missing or non-string field, empty text, bytes that are not UTF-8) raises ``DataError`` naming the
file and line (or Parquet/arrow row), unless ``skip_bad=True``, in which case it is returned in the
list of rejects with the reason. Nothing is dropped silently.

Accepted record shapes (first match wins):

* ``{"messages": [{"role": ..., "content": ...}, ...]}``  -> kind ``"messages"``
* ``{"prompt": ..., "response": ...}``                    -> kind ``"pair"``
* ``{"text": ...}``                                         -> kind ``"text"``
* ``{"prompt": ...}``                                       -> kind ``"prompt"`` (generate mode only)

``Row.index`` is the record's 0-based position among the input's records (blank JSONL lines are
not records). It is stable: the store's ``sample_index`` refers to it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant", "tool", "developer")


class DataError(ValueError):
    """A bad input record or file; the message names the file and line."""


@dataclass
class Row:
    index: int
    source: str  # "file:line" (JSONL) or "file:row N" (Parquet / arrow)
    kind: str  # "messages" | "pair" | "text" | "prompt"
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other fields (e.g. "answer" for filters)


@dataclass
class Reject:
    index: int
    source: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.index, "source": self.source, "reason": self.reason}


def validate_record(rec: Any) -> Row:
    """Turn one decoded record into a ``Row`` (index/source filled in by the caller) or raise ValueError."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    extra = {k: v for k, v in rec.items() if k not in ("messages", "prompt", "response", "text")}
    if "messages" in rec and rec["messages"] is not None:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("field 'messages' must be a non-empty list of {role, content}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must have 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}] has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
            if not isinstance(m["content"], str) or not m["content"].strip():
                raise ValueError(f"messages[{i}] has empty or non-string content")
            out.append({"role": m["role"], "content": m["content"]})
        return Row(-1, "", "messages", messages=out, extra=extra)
    if "prompt" in rec and rec["prompt"] is not None:
        prompt = _text_field(rec, "prompt")
        if "response" in rec and rec["response"] is not None:
            return Row(-1, "", "pair", prompt=prompt, response=_text_field(rec, "response"), extra=extra)
        return Row(-1, "", "prompt", prompt=prompt, extra=extra)
    if "text" in rec and rec["text"] is not None:
        return Row(-1, "", "text", text=_text_field(rec, "text"), extra=extra)
    raise ValueError(f"missing field: expected 'messages', 'prompt' (+ 'response') or 'text'; got keys {sorted(rec)}")


def _text_field(rec: dict, name: str) -> str:
    v = rec[name]
    if not isinstance(v, str):
        raise ValueError(f"field {name!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise ValueError(f"field {name!r} is empty")
    return v


# --------------------------------------------------------------------------------------------------
# Raw record iterators: yield (source, record-or-exception)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            src = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield src, ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                yield src, json.loads(line)
            except json.JSONDecodeError as e:
                yield src, ValueError(f"malformed JSON: {e.msg} (column {e.colno})")


def _iter_table(table, label: str) -> Iterator[tuple[str, Any]]:
    for i, rec in enumerate(table.to_pylist()):
        yield f"{label}:row {i}", rec


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    yield from _iter_table(table, str(path))


def _iter_datasets_dir(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """A ``datasets.Dataset.save_to_disk`` folder (or a DatasetDict folder with one split chosen).

    Read with pyarrow directly (the ``datasets`` package is not needed): the folder holds
    ``state.json`` listing ``data-XXXXX-of-XXXXX.arrow`` files in Arrow IPC *stream* format.
    """
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        chosen = split or ("train" if "train" in splits else splits[0])
        if chosen not in splits:
            raise DataError(f"{path}: split {chosen!r} not in {splits}")
        path = path / chosen
    state = path / "state.json"
    if state.is_file():
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path / "*.arrow")))
    if not files:
        raise DataError(f"{path}: no .arrow files (expected a `datasets` save_to_disk folder)")
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                try:
                    table = pa.ipc.open_stream(src).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(src).read_all()
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{f}: cannot read arrow data: {e}") from e
        yield from _iter_table(table, str(f))


def iter_records(path: str | Path, split: str | None = None) -> Iterator[tuple[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data not found")
    if p.is_dir():
        if list(p.glob("*.parquet")):
            for f in sorted(p.glob("*.parquet")):
                yield from _iter_parquet(f)
            return
        yield from _iter_datasets_dir(p, split)
        return
    suffix = "".join(p.suffixes[-2:]).lower()
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson") or suffix.endswith(".jsonl"):
        yield from _iter_jsonl(p)
    elif p.suffix.lower() in (".parquet", ".pq"):
        yield from _iter_parquet(p)
    else:
        raise DataError(f"{p}: unknown data format (expected .jsonl, .parquet or a `datasets` save_to_disk folder)")


def read_rows(path: str | Path, skip_bad: bool = False, split: str | None = None) -> tuple[list[Row], list[Reject]]:
    """Read and validate every record of ``path``.

    Returns ``(rows, rejects)``; with ``skip_bad=False`` the first bad record raises ``DataError``
    ("FILE:LINE: reason"). Row indices count all records, bad ones included.
    """
    rows: list[Row] = []
    rejects: list[Reject] = []
    for index, (src, rec) in enumerate(iter_records(path, split)):
        try:
            if isinstance(rec, Exception):
                raise rec
            row = validate_record(rec)
        except ValueError as e:
            if not skip_bad:
                raise DataError(f"{src}: {e} (pass --skip-bad to write bad rows to rejects.jsonl instead)") from None
            rejects.append(Reject(index, src, str(e)))
            continue
        row.index, row.source = index, src
        rows.append(row)
    if not rows and not rejects:
        raise DataError(f"{path}: no records")
    return rows, rejects


def data_fingerprint(path: str | Path) -> dict[str, Any]:
    """sha256 over the input file(s), so a resumed store is refused if its data changed."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, p if p.is_dir() else p.parent).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {"name": p.name, "sha256": h.hexdigest()}
