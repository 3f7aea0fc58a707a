"""Calibration token sequences for pruning: from a data file, a kdship store, or plain texts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

from kdship.student.width import StudentError

log = logging.getLogger("kdship.student")


def _from_texts(tok, texts: Sequence[str]) -> Iterator[list[int]]:
    for t in texts:
        yield tok(t, add_special_tokens=False)["input_ids"]


def _from_data(tok, path: str) -> Iterator[list[int]]:
    """Rows rendered as ``kdship cache`` renders them (score mode; prompt-only rows as prompts)."""
    from kdship.data import read_rows
    from kdship.render import render_prompt, render_score

    rows, _ = read_rows(path)
    for row in rows:
        yield render_prompt(row, tok) if row.kind == "prompt" else render_score(row, tok)[0].tolist()


def _from_store(path: str) -> Iterator[list[int]]:
    from kdship.store import StoreReader

    reader = StoreReader(path)
    for _, shard in reader.iter_shards():
        for i in range(shard.num_samples):
            a, b = int(shard.offsets[i]), int(shard.offsets[i + 1])
            yield shard.tokens[a:b].tolist()


def calibration_sequences(source: str | Path | Sequence[str], tok, max_tokens: int, max_length: int) -> tuple[list[list[int]], str]:
    """Token sequences (each cut to ``max_length``, at least 2 tokens) until ``max_tokens`` are reached.

    ``source``: a kdship store directory, a data file/folder ``kdship cache`` reads (JSONL, Parquet,
    ``datasets`` folder), or a list of texts (tokenised without special tokens). Returns the
    sequences and a description of the source.
    """
    from kdship.store import store_exists

    if isinstance(source, (list, tuple)):
        seqs, what = _from_texts(tok, source), f"{len(source)} texts"
    elif store_exists(str(source)):
        seqs, what = _from_store(str(source)), f"store {source}"
    elif Path(source).exists():
        seqs, what = _from_data(tok, str(source)), f"data {source}"
    else:
        raise StudentError(f"--calibration {source}: not found (give a JSONL/Parquet data file or a kdship store directory)")
    out, total = [], 0
    for ids in seqs:
        ids = list(ids)[:max_length]
        if len(ids) < 2:
            continue
        out.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    if not out:
        raise StudentError(f"--calibration {source if not isinstance(source, (list, tuple)) else what}: no sequence with at least 2 tokens")
    log.info("calibration: %d sequences, %d tokens from %s", len(out), total, what)
    return out, what
