"""Shared by the benches that train on the demo's budget (train_recipe_demo, train_hint_demo, student_frontier):
one resumable training run per variant, and the held-out quality of several students in one `kdship eval`
run (the live teacher loaded once)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable


def train_variant(state: dict, key: str, run: Path, save: Callable[[], None], record: dict[str, Any], store: str, student: str, sizes, **options: Any) -> None:
    """`kdship train` of ``student`` on ``store`` into ``run`` with the demo's epochs, batch and lr (``options``
    add or override), recorded as ``state["runs"][key]`` (``record`` plus the run's figures) and saved;
    skipped when that record and its final model already exist (a rerun continues where it stopped)."""
    from kdship.train.trainer import train

    if key in state["runs"] and (run / "final" / "config.json").is_file():
        return
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    opts = dict(epochs=sizes.epochs, lr=sizes.lr, batch_tokens=sizes.batch_tokens, eval_every=0, ckpt_every=0, progress=False, **options)
    s = train(store, student=student, out=str(run), **opts)
    state["runs"][key] = {**record, "final": s["final"], "steps": s["steps"], "tokens": s["tokens"], "train_s": round(time.time() - t0, 1)}
    save()
    print(key, state["runs"][key], flush=True)


def eval_lm(models: dict[str, str], assets: dict, out: Path, items: int, keys=("perplexity", "kl_to_teacher")) -> dict:
    """`kdship eval --task lm` of ``models`` on the demo's held-out chats ("id") and Shakespeare ("ood"):
    {"models": sorted names, "splits": {split: {model (and "teacher"): {key: value}}}}."""
    from kdship.eval.run import evaluate

    ev = evaluate(models=models, data=assets["data"]["heldout"], teacher=assets["teacher"], ood=assets["data"]["ood"], perturb=(),
                  out=str(out), task="lm", limit=items, seed=0, progress=False)
    return {"models": sorted(models), "splits": {sp: {m: {k: v.get(k) for k in keys} for m, v in ev["splits"][sp]["metrics"].items()} for sp in ("id", "ood")}}
