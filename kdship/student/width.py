"""Width pruning by activation importance (Minitron, arXiv 2407.14679), for Llama-family models.

One calibration pass with hooks measures, per token and averaged over the calibration tokens:

* hidden (embedding) channels: ``|y_c|`` of every RMSNorm's output ``y``, summed over all norms (each
  layer's two and the final one): the residual stream has one set of channels, so one ranking;
* MLP neurons, per layer: ``|act(gate(x)) * up(x)|``, the input of ``down_proj``;
* attention heads, per layer: the L2 norm of each head's attention output (the input of ``o_proj``,
  before the heads are mixed).

The top channels / neurons / heads are kept *in their original order* and every weight is sliced to
match: embeddings and lm_head (tied or not) lose hidden columns, each norm weight its entries, q/k/v/o
and gate/up/down rows and columns. Nothing pruned means every index kept: the teacher's exact weights.

GQA: query head ``h`` reads KV head ``h // (heads / kv_heads)``. If the asked head count is a multiple
of the teacher's KV heads, every KV group is kept and loses the same number of its least important
query heads (``within_groups``: the KV cache stays the same, what Minitron did for its GQA models);
otherwise, if it is a multiple of the group size, whole groups go, their K/V heads with them, ranked
by the summed importance of their query heads (``whole_groups``; for multi-head attention, group size
1, that is plain head pruning).

RMSNorm divides by the root mean square over the channels it sees. Dropping channels changes that
mean, so each norm's weight is multiplied by ``rms_kept / rms_all`` measured on its calibration input:
when the dropped channels carry no energy the pruned norm then computes exactly what the teacher's did
on the kept channels; otherwise it restores the average scale.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from kdship.student.depth import model_from_state

log = logging.getLogger("kdship.student")

LLAMA_MODEL_TYPES = ("llama",)


class StudentError(ValueError):
    """A student shape or input that cannot be used; the message names the flag and the value."""


@dataclass
class Importance:
    """Calibration statistics, averaged over tokens (tensors on the CPU)."""

    hidden: object  # [H]: summed mean |norm output| per channel
    neurons: list  # per layer [I]: mean |act(gate) * up|
    heads: list  # per layer [A]: mean L2 norm of each head's attention output
    norm_energy: dict = field(default_factory=dict)  # norm weight key -> [H] mean x^2 of its input
    tokens: int = 0


def _norm_keys(model) -> dict[object, str]:
    """RMSNorm module -> its weight's state-dict key."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        out[layer.input_layernorm] = f"model.layers.{i}.input_layernorm.weight"
        out[layer.post_attention_layernorm] = f"model.layers.{i}.post_attention_layernorm.weight"
    out[model.model.norm] = "model.norm.weight"
    return out


def collect_importance(model, batches: list[list[int]], progress: bool = False) -> Importance:
    """One forward pass over the calibration sequences with hooks on the norms, o_proj and down_proj."""
    import torch
    from tqdm.auto import tqdm

    cfg = model.config
    H, n_layers, A = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = model.model.layers[0].self_attn.head_dim
    imp = Importance(
        hidden=torch.zeros(H, dtype=torch.float64),
        neurons=[torch.zeros(cfg.intermediate_size, dtype=torch.float64) for _ in range(n_layers)],
        heads=[torch.zeros(A, dtype=torch.float64) for _ in range(n_layers)],
    )
    hooks = []

    def on_norm(key):
        imp.norm_energy[key] = torch.zeros(H, dtype=torch.float64)

        def hook(_mod, inputs, output):
            imp.hidden.add_(output.detach().abs().reshape(-1, H).sum(0).double())
            imp.norm_energy[key].add_(inputs[0].detach().double().pow(2).reshape(-1, H).sum(0))

        return hook

    def on_input(acc, per_head: bool):
        def hook(_mod, inputs):
            x = inputs[0].detach().double()
            x = x.reshape(-1, A, head_dim).norm(dim=-1) if per_head else x.abs().reshape(-1, x.shape[-1])
            acc.add_(x.sum(0))

        return hook

    for mod, key in _norm_keys(model).items():
        hooks.append(mod.register_forward_hook(on_norm(key)))
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_input(imp.heads[i], True)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_input(imp.neurons[i], False)))
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="kdship student: calibration forward", unit="seq", disable=not progress):
                model(input_ids=torch.tensor([ids]))
                imp.tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    for t in [imp.hidden, *imp.neurons, *imp.heads, *imp.norm_energy.values()]:
        t.div_(max(imp.tokens, 1))
    return imp


def allowed_heads(teacher_heads: int, kv_heads: int) -> list[int]:
    """The query-head counts a student can keep: a multiple of the KV heads or of the group size."""
    group = teacher_heads // kv_heads
    return [a for a in range(1, teacher_heads + 1) if a % kv_heads == 0 or a % group == 0]


def head_mode(teacher_heads: int, kv_heads: int, heads: int) -> str:
    """``within_groups`` / ``whole_groups`` (module docstring) or StudentError naming --heads."""
    group = teacher_heads // kv_heads
    if heads == teacher_heads or heads % kv_heads == 0:
        return "within_groups"
    if heads % group == 0:
        return "whole_groups"
    allowed = allowed_heads(teacher_heads, kv_heads)
    raise StudentError(
        f"--heads {heads}: the teacher has {teacher_heads} query heads in {kv_heads} KV groups of {group}; "
        f"a student keeps every group with the same number of query heads each, or whole groups: choose one of {allowed}"
    )


def _top(scores, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in their original order (ties: lower index first)."""
    import torch

    order = torch.argsort(-scores, stable=True)[:k]
    return sorted(order.tolist())


def choose_heads(scores, kv_heads: int, heads: int, mode: str) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) of one layer, from its per-head importance ``scores``."""
    group = len(scores) // kv_heads
    if mode == "within_groups":
        per_group = heads // kv_heads
        q = [g * group + j for g in range(kv_heads) for j in _top(scores[g * group : (g + 1) * group], per_group)]
        return q, list(range(kv_heads))
    group_scores = scores.reshape(kv_heads, group).sum(-1)
    kv = _top(group_scores, heads // group)
    return [g * group + j for g in kv for j in range(group)], kv


@dataclass
class WidthPlan:
    hidden: list[int]  # kept residual channels
    neurons: list[list[int]]  # per layer
    q_heads: list[list[int]]  # per layer
    kv_heads: list[list[int]]  # per layer
    head_mode: str


def plan_width(imp: Importance, cfg, hidden: int, intermediate: int, heads: int) -> WidthPlan:
    mode = head_mode(cfg.num_attention_heads, cfg.num_key_value_heads, heads)
    per_layer = [choose_heads(s, cfg.num_key_value_heads, heads, mode) for s in imp.heads]
    return WidthPlan(
        hidden=_top(imp.hidden, hidden),
        neurons=[_top(s, intermediate) for s in imp.neurons],
        q_heads=[q for q, _ in per_layer],
        kv_heads=[kv for _, kv in per_layer],
        head_mode=mode,
    )


def _rows_of(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _slice_param(key: str, v, plan: WidthPlan, head_dim: int):
    """One state-dict tensor narrowed to the plan; unknown keys are an error (never silently kept)."""
    h = plan.hidden
    if key.endswith(("embed_tokens.weight", "lm_head.weight")):
        return v[:, h]
    if key == "model.norm.weight" or key.endswith("layernorm.weight"):
        return v[h]
    parts = key.split(".")
    if key.startswith("model.layers.") and len(parts) == 6:
        layer, proj, kind = int(parts[2]), parts[4], parts[5]
        rows = {
            "q_proj": _rows_of(plan.q_heads[layer], head_dim),
            "k_proj": _rows_of(plan.kv_heads[layer], head_dim),
            "v_proj": _rows_of(plan.kv_heads[layer], head_dim),
            "gate_proj": plan.neurons[layer],
            "up_proj": plan.neurons[layer],
            "o_proj": h,
            "down_proj": h,
        }.get(proj)
        cols = {"o_proj": _rows_of(plan.q_heads[layer], head_dim), "down_proj": plan.neurons[layer]}.get(proj, h)
        if rows is not None and kind == "bias":
            return v[rows]
        if rows is not None and kind == "weight":
            return v[rows][:, cols]
    raise StudentError(f"width pruning: no rule for weight {key!r} {tuple(v.shape)} (a Llama variant kdship does not know)")


def width_prune(model, plan: WidthPlan, imp: Importance) -> tuple[object, dict]:
    """A new model with the plan's shapes and sliced weights; also the RMS correction per norm."""
    cfg = copy.deepcopy(model.config)
    head_dim = model.model.layers[0].self_attn.head_dim
    H_old, H_new = cfg.hidden_size, len(plan.hidden)
    cfg.hidden_size, cfg.head_dim = H_new, head_dim  # head_dim explicit: hidden / heads no longer gives it
    cfg.intermediate_size = len(plan.neurons[0])
    cfg.num_attention_heads, cfg.num_key_value_heads = len(plan.q_heads[0]), len(plan.kv_heads[0])
    sd, rms_scale = {}, {}
    for key, v in model.state_dict().items():
        if "rotary_emb" in key:
            sd[key] = v
            continue
        v = _slice_param(key, v, plan, head_dim).clone()
        if key in imp.norm_energy and H_new < H_old:
            e = imp.norm_energy[key]
            scale = ((e[plan.hidden].sum() / H_new) / (e.sum() / H_old)).sqrt().item() if e.sum() > 0 else 1.0
            rms_scale[key] = round(scale, 5)
            v = v * scale
        sd[key] = v
    return model_from_state(type(model), cfg, sd, "width pruning"), {"rms_scale": rms_scale}
