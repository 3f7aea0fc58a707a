"""Evaluation items: rows read with ``kdship.data.read_rows`` (JSONL / Parquet / datasets folder) or
samples of a kdship store, and the task kind they call for.

Task kinds, detected from the first row's fields unless ``--task`` says (every row must fit):

=============  ==============================================================  =====================
task           row fields                                                      metric(s)
=============  ==============================================================  =====================
``lm``         ``text`` | ``prompt`` + ``response`` | ``messages``             NLL, perplexity, KL
``answer``     ``prompt`` (or ``messages``) + ``answer`` ("... #### 42")       exact match
``choice``     ``prompt`` + ``choices`` [str] + ``label`` (index or the text)  accuracy (+ length-norm)
``generation`` ``prompt`` + ``reference`` | ``references`` [str]               ROUGE-L F1
=============  ==============================================================  =====================

With ``--task answer`` / ``generation`` a ``prompt`` + ``response`` row uses the response as the
reference. A kdship store given as ``--data`` is an ``lm`` task over its stored token sequences
(scored where ``loss_mask`` is set) -- the KL to its teacher then needs no tokenisation at all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdship.eval.perturb import perturb_text

TASKS = ("lm", "answer", "choice", "generation")


class TaskError(ValueError):
    """Rows that do not fit the task; the message names the file and line."""


@dataclass
class Item:
    index: int  # the input row's index (the store's sample_index for store items)
    source: str  # "file:line", or "store:shard/sample"
    row: Any = None  # kdship.data.Row (None for store items)
    tokens: np.ndarray | None = None  # store items: fixed tokens
    loss_mask: np.ndarray | None = None
    reference: str | None = None  # answer / generation reference
    references: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    label: int | None = None
    perturbed: str | None = None  # which perturbation made this copy


def is_store(path: str | Path) -> bool:
    p = Path(path)
    if "://" in str(path):
        from kdship.store import store_exists

        return store_exists(str(path))
    return p.is_dir() and (p / "zarr.json").is_file()


def detect_task(fields: dict[str, Any], kind: str) -> str:
    if "choices" in fields or "options" in fields:
        return "choice"
    if "answer" in fields or "final_answer" in fields:
        return "answer"
    if "reference" in fields or "references" in fields:
        return "generation"
    if kind in ("text", "pair", "messages"):
        return "lm"
    raise TaskError("a prompt-only row has nothing to evaluate: add 'answer', 'choices' + 'label', 'reference', or a 'response'")


def load_items(path: str | Path, task: str | None = None, limit: int | None = None) -> tuple[str, list[Item]]:
    """Read ``path`` into items of one task (detected from the first row unless given)."""
    if task is not None and task not in TASKS:
        raise TaskError(f"--task {task!r}: known tasks are {', '.join(TASKS)}")
    if is_store(path):
        if task not in (None, "lm"):
            raise TaskError(f"{path} is a kdship store: only the lm task can be evaluated on it (asked {task!r})")
        return "lm", load_store_items(str(path), limit)
    from kdship.data import read_rows

    rows, _ = read_rows(path, skip_bad=False)
    if limit:
        rows = rows[:limit]
    if task is None:
        try:
            task = detect_task(rows[0].extra, rows[0].kind)
        except TaskError as e:
            raise TaskError(f"{rows[0].source}: {e}") from None
    return task, [make_item(r, task) for r in rows]


def make_item(row, task: str) -> Item:
    ex = row.extra or {}
    item = Item(index=row.index, source=row.source, row=row)
    where = row.source

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise TaskError(f"{where}: task {task!r} needs {what}")

    if task == "lm":
        need(row.kind in ("text", "pair", "messages"), "'text', 'prompt' + 'response' or 'messages' with an assistant turn")
    elif task == "answer":
        need(row.kind in ("prompt", "pair", "messages"), "a 'prompt' or 'messages'")
        ref = ex.get("answer", ex.get("final_answer"))
        if ref is None and row.kind == "pair":
            ref = row.response
        if ref is None and row.kind == "messages" and row.messages[-1]["role"] == "assistant":
            ref = row.messages[-1]["content"]
        need(ref is not None and str(ref).strip() != "", "an 'answer' field")
        item.reference = str(ref)
    elif task == "choice":
        need(row.kind in ("prompt", "pair", "messages"), "a 'prompt'")
        choices = ex.get("choices", ex.get("options"))
        need(isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices), "'choices': a list of >= 2 non-empty strings")
        label = ex.get("label", ex.get("answer"))
        if isinstance(label, str) and label in choices:
            label = choices.index(label)
        need(isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices), f"'label': an index into the {len(choices)} choices or one of their texts")
        item.choices, item.label = list(choices), int(label)
    elif task == "generation":
        need(row.kind in ("prompt", "pair", "messages"), "a 'prompt'")
        refs = ex.get("references", ex.get("reference"))
        if refs is None and row.kind == "pair":
            refs = row.response
        if isinstance(refs, str):
            refs = [refs]
        need(isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs), "'reference' (a string) or 'references' (strings)")
        item.references = list(refs)
    else:
        raise TaskError(f"unknown task {task!r}")
    return item


def load_store_items(url: str, limit: int | None = None) -> list[Item]:
    from kdship.store import StoreReader

    reader = StoreReader(url)
    items: list[Item] = []
    for path, shard in reader.iter_shards():
        for i in range(shard.num_samples):
            s = shard.sample(i)
            items.append(Item(index=s["sample_index"], source=f"{url}:{path}/{i}", tokens=np.asarray(s["tokens"]), loss_mask=np.asarray(s["loss_mask"])))
            if limit and len(items) >= limit:
                return items
    return items


# --------------------------------------------------------------------------------------------------
# Rendering with a model's tokenizer


def lm_tokens(item: Item, tok) -> tuple[np.ndarray, np.ndarray]:
    """tokens [L], loss_mask [L] (the cache's own rendering, so store sample hashes match)."""
    if item.tokens is not None:
        return item.tokens, item.loss_mask
    from kdship.render import render_score

    return render_score(item.row, tok)


def prompt_tokens(item: Item, tok) -> list[int]:
    from kdship.render import render_prompt

    return render_prompt(item.row, tok)  # a pair's response is the reference, never part of the prompt


# --------------------------------------------------------------------------------------------------
# Perturbed copies


def input_text(item: Item) -> str | None:
    r = item.row
    if r is None:
        return None
    if r.kind == "text":
        return r.text
    if r.kind in ("prompt", "pair"):
        return r.prompt
    if r.kind == "messages":
        for m in reversed(r.messages):
            if m["role"] == "user":
                return m["content"]
    return None


def perturb_item(item: Item, kind: str, seed: int, rate: float = 0.1) -> Item:
    """A copy of ``item`` with its input text (text / prompt / last user message) perturbed."""
    if item.row is None:
        raise TaskError(f"{item.source}: store items have fixed tokens and cannot be perturbed")
    new = copy.deepcopy(item)
    r = new.row
    text = input_text(item)
    if text is None:
        return new
    edited = perturb_text(text, kind, seed, item.index, rate)
    if r.kind == "text":
        r.text = edited
    elif r.kind in ("prompt", "pair"):
        r.prompt = edited
    else:
        for m in reversed(r.messages):
            if m["role"] == "user":
                m["content"] = edited
                break
    new.perturbed = kind
    return new
