"""Teacher hidden states for hint (feature) KD: ``kdship cache --hidden-layers L1,L2 --hidden-dim D``.

Layers index transformers' ``output_hidden_states`` tuple: 0 = the embeddings, i = after block i
(the last, i = num_hidden_layers, is after the final norm in Llama-family models). Before the first
shard a PCA projection to D dimensions is fitted per layer on the first rows (up to
``FIT_POSITIONS`` positions, mean-centred) and written into the store; every shard, including those
of a resumed run or another process, is projected with that stored projection (``kdship.store``).
Row j of a sample stores the projected state at position j - 1: the one that predicts token j, as
the student's does in the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kdship.store import HIDDEN_QMAX, HiddenProjection

# positions the projection is fitted on: enough for a stable covariance of H <= a few thousand
FIT_POSITIONS = 16384
# the hidden arrays' blosc-zstd level (int8 codes of PCA coefficients compress little at any level)
HIDDEN_CLEVEL = 5


class HiddenStatesError(ValueError):
    """Bad --hidden-layers / --hidden-dim; the message names the flag."""


def parse_layers(value: str | list[int] | None) -> list[int] | None:
    """``"1,3"`` or ``[1, 3]`` -> [1, 3]; None / "" -> None."""
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        layers = [int(str(x).strip()) for x in items]
    except ValueError:
        raise HiddenStatesError(f"--hidden-layers {value!r}: expected comma-separated layer numbers, e.g. 4,8") from None
    if len(set(layers)) != len(layers):
        raise HiddenStatesError(f"--hidden-layers {value!r}: a layer is named twice")
    return layers


def hidden_spec(teacher: str, layers: list[int], dim: int) -> dict[str, Any]:
    """The header's ``hidden_states`` entry, checked against the teacher's config (before any engine)."""
    f = Path(teacher) / "config.json"
    if not f.is_file():
        raise HiddenStatesError(f"--hidden-layers: teacher {teacher} has no config.json to read its layers and hidden size from")
    cfg = json.loads(f.read_text())
    cfg = cfg.get("text_config", cfg)
    n_layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    bad = [x for x in layers if not 0 <= x <= n_layers]
    if bad:
        raise HiddenStatesError(
            f"--hidden-layers {','.join(map(str, layers))}: the teacher has hidden states 0..{n_layers} "
            f"(0 = embeddings, i = after block i); {bad} out of range"
        )
    if not 1 <= dim <= hidden:
        raise HiddenStatesError(f"--hidden-dim {dim}: must be in 1..{hidden} (the teacher's hidden size)")
    return {
        "layers": list(layers),
        "dim": int(dim),
        "hidden_size": hidden,
        "teacher_layers": n_layers,
        "row_alignment": "row j = the state at position j - 1 (predicting token j); 0 where the row has no target",
        "projection": {"kind": "pca", "centred": True, "fit_positions": FIT_POSITIONS, "arrays": "hidden_projection/{mean,components}"},
        "encoding": {"dtype": "int8", "qmax": HIDDEN_QMAX, "scale": "float16 per (row, layer): max |value| / 127", "clevel": HIDDEN_CLEVEL},
    }


def fit_projection(states: list[np.ndarray], layers: list[int], dim: int) -> HiddenProjection:
    """PCA per layer over [N_i, layers, H] states: the mean and the top ``dim`` eigenvectors of the
    covariance (float64), signs fixed so the largest |entry| of each is positive (deterministic)."""
    import torch

    x = torch.from_numpy(np.concatenate(states)).double()  # [N, layers, H]
    means, comps, variances = [], [], []
    for li in range(len(layers)):
        xl = x[:, li]
        mu = xl.mean(0)
        c = xl - mu
        evals, evecs = torch.linalg.eigh(c.T @ c / max(1, len(c) - 1))
        order = torch.argsort(evals, descending=True)[:dim]
        top = evecs[:, order].T  # [D, H]
        sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        means.append(mu.float().numpy())
        comps.append((top * sign).float().numpy())
        variances.append(evals[order].clamp(min=0).float().numpy())
    return HiddenProjection(list(layers), np.stack(means), np.stack(comps), np.stack(variances))


def fit_on_first_rows(backend, items: dict[int, dict[str, Any]], layers: list[int], dim: int) -> HiddenProjection:
    """The projection fitted on the first rows' teacher-forced states (prompts in generate mode), up to
    FIT_POSITIONS predicting positions."""
    seqs, n = [], 0
    for i in sorted(items):
        toks = items[i]["tokens"]
        seqs.append(toks.tolist())
        n += max(1, len(toks) - 1)
        if n >= FIT_POSITIONS:
            break
    states = [h[: max(1, len(h) - 1)] for h in backend.hidden_states(seqs, layers)]  # predicting positions
    return fit_projection(states, layers, dim)


def attach_hidden_states(backend, samples: list[dict[str, Any]], projection: HiddenProjection) -> None:
    """Add ``hidden_states`` float32 [L, layers, D] (row-aligned, projected) to each sample dict."""
    if not samples:
        return
    states = backend.hidden_states([s["tokens"].tolist() for s in samples], projection.layers)
    for s, h in zip(samples, states):
        ids = s["target_ids"] if "target_ids" in s else s["topk_ids"]
        rows = np.zeros((len(h),) + projection.components.shape[:2], np.float32)
        rows[1:] = projection.project(h[:-1])
        rows[np.asarray(ids)[:, 0] < 0] = 0.0  # rows without a target (row 0, prompt rows) carry nothing
        s["hidden_states"] = rows
