"""Shared by the benches that train on the demo's budget (train_recipe_demo, train_hint_demo, student_frontier):
held-out quality of several students in one `kdship eval` run (the live teacher loaded once)."""

from __future__ import annotations

from pathlib import Path


def eval_lm(models: dict[str, str], assets: dict, out: Path, items: int, keys=("perplexity", "kl_to_teacher")) -> dict:
    """`kdship eval --task lm` of ``models`` on the demo's held-out chats ("id") and Shakespeare ("ood"):
    {"models": sorted names, "splits": {split: {model (and "teacher"): {key: value}}}}."""
    from kdship.eval.run import evaluate

    ev = evaluate(models=models, data=assets["data"]["heldout"], teacher=assets["teacher"], ood=assets["data"]["ood"], perturb=(),
                  out=str(out), task="lm", limit=items, seed=0, progress=False)
    return {"models": sorted(models), "splits": {sp: {m: {k: v.get(k) for k in keys} for m, v in ev["splits"][sp]["metrics"].items()} for sp in ("id", "ood")}}
