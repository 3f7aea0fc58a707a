"""Depth pruning: keep a few of the teacher's decoder layers.

NVIDIA's Minitron recipe prunes a trained model, then distils the teacher into it; depth pruning
(dropping whole layers) keeps the tokenizer, the embeddings and the LM head, so the student shares the
teacher's vocabulary by construction.

Which layers to keep is chosen on calibration text from three candidate sets, by the pruned model's
own next-token loss there (lowest wins):

* ``influence``: the ``keep`` layers with the largest Block Influence (ShortGPT, arXiv 2403.03853),
  ``BI_i = 1 - mean_t cos(h_i[t], h_{i+1}[t])`` where ``h_i`` is layer i's input hidden state:
  layers that barely rotate the residual stream are the cheapest to drop;
* ``ends``: the first ``keep - 1`` layers plus the last (early layers build features, the last one
  maps to the vocabulary);
* ``spread``: ``keep`` layers evenly spaced from first to last.
"""

from __future__ import annotations

import copy
import logging
import math

log = logging.getLogger("kdship.student")


def _candidates(n_layers: int, keep: int, influence: list[float]) -> dict[str, list[int]]:
    by_bi = sorted(range(n_layers), key=lambda i: -influence[i])[:keep]
    spread = sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [0]
    return {
        "influence": sorted(by_bi),
        "ends": list(range(keep - 1)) + [n_layers - 1] if keep > 1 else [0],
        "spread": spread,
    }


def select_layers(model, keep_idx: list[int]):
    """A new model of the same class holding only ``keep_idx`` layers (weights copied, renumbered)."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep_idx)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep_idx]
    sd = {}
    prefix = "model.layers."
    for k, v in model.state_dict().items():
        if k.startswith(prefix):
            old, rest = k[len(prefix) :].split(".", 1)
            if int(old) in keep_idx:
                sd[f"{prefix}{keep_idx.index(int(old))}.{rest}"] = v
        else:
            sd[k] = v
    return model_from_state(type(model), cfg, sd, "depth pruning")


def model_from_state(model_cls, cfg, state: dict, what: str):
    """A new ``model_cls(cfg)`` in fp32 eval mode holding exactly ``state`` (tied lm_head may be absent)."""
    import torch

    student = model_cls(cfg).to(torch.float32)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{what}: missing={missing[:4]} unexpected={unexpected[:4]}")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student.eval()


def mean_nll(model, batches: list[list[int]]) -> float:
    """Mean next-token loss (nats/token) of ``model`` over the calibration sequences."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            x = torch.tensor([ids])
            logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
            nll += -logp.gather(-1, x[0, 1:, None]).sum().item()
            n += len(ids) - 1
    return nll / max(n, 1)


def block_influence(model, batches: list[list[int]]) -> list[float]:
    """BI per layer from one pass with hidden states (``hidden_states[i]`` is layer i's input)."""
    import torch

    n_layers = model.config.num_hidden_layers
    bi_sum, count = [0.0] * n_layers, 0
    with torch.no_grad():
        for ids in batches:
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for i in range(n_layers):
                cos = torch.nn.functional.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1)
                bi_sum[i] += (1 - cos).sum().item()
            count += len(ids)
    return [b / count for b in bi_sum]


def depth_prune(model, keep: int, batches: list[list[int]]) -> tuple[object, dict]:
    """``model`` keeping ``keep`` layers chosen as the module docstring says, and what was measured.

    ``keep`` equal to the teacher's layer count keeps every layer (strategy ``"none"``), so depth and
    width pruning share one path.
    """
    n_layers = model.config.num_hidden_layers
    influence = block_influence(model, batches)
    teacher_nll = mean_nll(model, batches)
    info = {"teacher_layers": n_layers, "teacher_calibration_nll": round(teacher_nll, 4), "block_influence": [round(b, 5) for b in influence]}
    if keep == n_layers:
        return model, {**info, "kept_layers": list(range(n_layers)), "strategy": "none"}
    scored = {}
    for name, idx in _candidates(n_layers, keep, influence).items():
        scored[name] = (idx, mean_nll(select_layers(model, idx), batches))
        log.info("depth pruning candidate %-9s layers %s: calibration loss %.3f nats/token (teacher %.3f)", name, idx, scored[name][1], teacher_nll)
    best = min(scored, key=lambda k: scored[k][1])
    info.update(
        kept_layers=scored[best][0],
        strategy=best,
        calibration_nll={k: round(v[1], 4) for k, v in scored.items()},
        calibration_ppl={k: round(math.exp(min(v[1], 50)), 1) for k, v in scored.items()},
    )
    return select_layers(model, scored[best][0]), info
