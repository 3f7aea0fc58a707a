"""The run manifest: what a `kdship train` run was made from, written once and read by the verbs after it.

``RUN/kdship_run.json`` (and a copy in ``RUN/final/``, so a student folder alone says where it came
from)::

    {"store": ".../train.zarr", "heldout_fraction": 0.02, "loss": "fkl", "student": "...",
     "seed": 0, "online_teacher": null, "kdship_version": "..."}

``kdship export RUN`` takes the store and the held-out rule from it, so the student's KL to the teacher
is measured on exactly the samples the trainer held out, with nothing retyped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_FILE = "kdship_run.json"
FINAL_DIR = "final"
FINAL_PREVIOUS_DIR = "final.previous"  # the replaced final/, for the instant between two renames


@dataclass(frozen=True)
class RunManifest:
    store: str
    heldout_fraction: float
    loss: str
    student: str | None
    seed: int
    online_teacher: str | None = None
    kdship_version: str | None = None

    def write(self, folder: str | Path) -> Path:
        """Write (atomically) into ``folder``; returns the file."""
        path = Path(folder) / MANIFEST_FILE
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_config(cls, cfg: dict[str, Any], store: str, student: str | None) -> "RunManifest":
        from kdship import __version__

        return cls(store=str(store), heldout_fraction=float(cfg["heldout_fraction"]), loss=str(cfg["loss"]), student=student,
                   seed=int(cfg["seed"]), online_teacher=cfg.get("online_teacher"), kdship_version=__version__)


def read_manifest(model_dir: str | Path) -> RunManifest | None:
    """The manifest of a run folder or of its ``final/`` (None for a folder no `kdship train` wrote)."""
    for cand in (Path(model_dir), Path(model_dir) / "final", Path(model_dir).parent):
        f = cand / MANIFEST_FILE
        if f.is_file():
            data = json.loads(f.read_text())
            known = {k: data[k] for k in RunManifest.__dataclass_fields__ if k in data}
            return RunManifest(**known)
    return None


def final_dir(run_dir: str | Path) -> Path:
    """``RUN/final``; if a crash fell between the two renames that replace it (see ``replace_final``),
    the previous one, which is complete."""
    run = Path(run_dir)
    if not (run / FINAL_DIR).exists() and (run / FINAL_PREVIOUS_DIR).is_dir():
        return run / FINAL_PREVIOUS_DIR
    return run / FINAL_DIR


def replace_final(new: str | Path, run_dir: str | Path) -> Path:
    """Move the complete folder ``new`` to ``RUN/final`` so that at every moment a complete student
    exists: the old final/ is renamed aside, the new one renamed in, then the old one deleted (a crash
    between the renames leaves ``final.previous``, which ``final_dir`` and the next save pick up)."""
    import shutil

    run = Path(run_dir)
    final, previous = run / FINAL_DIR, run / FINAL_PREVIOUS_DIR
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(new, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final
