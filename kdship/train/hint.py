"""Hint (feature) KD from the store: ``kdship train --hint-weight W [--hint-map s1:t1,...] [--hint-loss mse|cosine]``.

The store holds the teacher's hidden states at some layers t, projected to D dimensions (``kdship
cache --hidden-layers --hidden-dim``; row j = the state that predicts token j). For each pair (s, t)
the student's hidden state at layer s (transformers' ``output_hidden_states`` index: 0 = embeddings,
i = after block i) at the same predicting positions as the logit loss goes through a learned linear
map (student hidden -> D, trained with the student, checkpointed, never exported) and is compared
with the stored state::

    mse      ||A h_s + b - y_t||^2 / sum_d var_t[d]      var_t: the projection's per-component variance,
                                                          so 1.0 = no better than predicting the mean
    cosine   1 - cos(A h_s + b, y_t)

    hint = mean over pairs of sum_rows row_weight * row loss       (row weights as the logit loss's)
    loss = logit loss + W * hint

Default map: every stored teacher layer t is paired with the student layer s = floor(t * S / T + 1/2)
(S, T the student's and the teacher's number of blocks): proportional depth, the ends paired with
the ends (embeddings with embeddings, the last layer with the last).
"""

from __future__ import annotations

import math
from typing import Any

import torch

HINT_LOSSES = ("mse", "cosine")


class HintError(ValueError):
    """A hint setting the store or the student cannot take; the message names the flag."""


def parse_hint_map(value: str | list | None) -> list[tuple[int, int]] | None:
    """``"2:4,3:8"`` (or ``[[2, 4], [3, 8]]`` from YAML) -> [(2, 4), (3, 8)] (student, teacher)."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    pairs = []
    for it in items:
        parts = it.split(":") if isinstance(it, str) else list(it)
        try:
            s, t = (int(str(x).strip()) for x in parts)
        except ValueError:
            raise HintError(f"--hint-map {value!r}: expected student:teacher layer pairs, e.g. 1:4,2:8") from None
        pairs.append((s, t))
    return pairs


def resolve_hint_map(value, store_layers: list[int], teacher_layers: int, student_layers: int, store: str) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs: ``value`` checked, or the default proportional map."""
    pairs = parse_hint_map(value)
    if pairs is None:
        return [(math.floor(t * student_layers / teacher_layers + 0.5), t) for t in store_layers]
    for s, t in pairs:
        if t not in store_layers:
            raise HintError(f"--hint-map {s}:{t}: the store {store} holds teacher hidden states at layers {store_layers} only, not {t}")
        if not 0 <= s <= student_layers:
            raise HintError(f"--hint-map {s}:{t}: the student has hidden states 0..{student_layers} (0 = embeddings, i = after block i), not {s}")
    return pairs


def hint_row_losses(kind: str, pred: torch.Tensor, target: torch.Tensor, variance_sum: torch.Tensor) -> torch.Tensor:
    """[N] per-row losses between the mapped student states and the stored teacher states [N, D]."""
    if kind == "mse":
        return ((pred - target) ** 2).sum(-1) / variance_sum
    return 1.0 - torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-8)


class HintHead(torch.nn.Module):
    """The learned maps (one ``Linear(student hidden, D)`` per pair) and the hint loss."""

    def __init__(self, pairs: list[tuple[int, int]], store_layers: list[int], variance, student_hidden: int, dim: int, kind: str, weight: float, seed: int = 0):
        super().__init__()
        if kind not in HINT_LOSSES:
            raise HintError(f"--hint-loss {kind!r}: expected one of {', '.join(HINT_LOSSES)}")
        self.pairs, self.kind, self.weight = list(pairs), kind, float(weight)
        self.target_index = [store_layers.index(t) for _, t in pairs]
        with torch.random.fork_rng(devices=[]):  # the maps' init depends on --seed only, not on what ran before
            torch.manual_seed(seed)
            self.maps = torch.nn.ModuleList(torch.nn.Linear(student_hidden, dim) for _ in pairs)
        # the MSE's scale: the stored layer's total variance (a property of the store, not learned)
        var = torch.as_tensor(variance, dtype=torch.float32).sum(-1).clamp(min=1e-12)
        self.register_buffer("variance_sum", var, persistent=False)

    def forward(self, hidden_states: tuple, pred_index: torch.Tensor, rows: Any) -> torch.Tensor:
        """hidden_states: the student's ``output_hidden_states`` tuple ([R, C, H] each); rows: the batch's
        rows with ``hint_targets`` [N, L, D] and ``row_weight`` [N]."""
        total = torch.zeros((), dtype=torch.float32, device=pred_index.device)
        for (s, _), ti, lin in zip(self.pairs, self.target_index, self.maps):
            h = hidden_states[s]
            pred = lin(h.reshape(-1, h.shape[-1])[pred_index].float())
            per_row = hint_row_losses(self.kind, pred, rows.hint_targets[:, ti], self.variance_sum[ti])
            total = total + (rows.row_weight * per_row).sum()
        return total / max(1, len(self.pairs))
