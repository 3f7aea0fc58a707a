"""Depth pruning: a student that is a copy of the teacher keeping a few of its decoder layers.

NVIDIA's Minitron recipe prunes a trained model, then distils the teacher into it; depth pruning
(dropping whole layers) is the simplest of its axes and keeps the tokenizer, the embeddings and the
LM head, so the student shares the teacher's vocabulary by construction.

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

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("kdship.demo")


def _candidates(n_layers: int, keep: int, influence: list[float]) -> dict[str, list[int]]:
    by_bi = sorted(range(n_layers), key=lambda i: -influence[i])[:keep]
    spread = sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [0]
    return {
        "influence": sorted(by_bi),
        "ends": list(range(keep - 1)) + [n_layers - 1] if keep > 1 else [0],
        "spread": spread,
    }


def _calibration_ids(tokenizer, texts: list[str], max_tokens: int, max_length: int) -> list[list[int]]:
    out, total = [], 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        out.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    if not out:
        raise ValueError("depth pruning: no calibration text with at least 2 tokens")
    return out


def _select(model, keep_idx: list[int]):
    """A new model of the same class holding only ``keep_idx`` layers (weights copied, renumbered)."""
    import copy

    import torch

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep_idx)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep_idx]
    student = type(model)(cfg).to(torch.float32)
    sd = {}
    prefix = "model.layers."
    for k, v in model.state_dict().items():
        if k.startswith(prefix):
            old, rest = k[len(prefix) :].split(".", 1)
            if int(old) in keep_idx:
                sd[f"{prefix}{keep_idx.index(int(old))}.{rest}"] = v
        else:
            sd[k] = v
    missing, unexpected = student.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"depth pruning: missing={missing[:4]} unexpected={unexpected[:4]}")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student.eval()


def _mean_nll(model, batches: list[list[int]]) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            x = torch.tensor([ids])
            logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
            nll += -logp.gather(-1, x[0, 1:, None]).sum().item()
            n += len(ids) - 1
    return nll / max(n, 1)


def depth_prune(
    teacher_dir: str | Path,
    out: str | Path,
    keep: int,
    calibration_texts: list[str],
    calibration_tokens: int = 2048,
    max_length: int = 512,
) -> dict:
    """Write a depth-pruned copy of ``teacher_dir`` (HF dir) keeping ``keep`` layers to ``out``.

    Returns (and writes to ``out/kdship_prune.json``) the chosen layers, the strategy, each
    candidate's calibration loss (mean NLL in nats/token) and the teacher's for reference, and the
    parameter counts.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, out = Path(teacher_dir), Path(out)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    if not 1 <= keep < n_layers:
        raise ValueError(f"--keep-layers {keep}: must be between 1 and {n_layers - 1} (the teacher has {n_layers} layers)")
    batches = _calibration_ids(tok, calibration_texts, calibration_tokens, max_length)

    # Block Influence from one pass with hidden states: hidden_states[i] is layer i's input.
    bi_sum, count = [0.0] * n_layers, 0
    with torch.no_grad():
        for ids in batches:
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for i in range(n_layers):
                cos = torch.nn.functional.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1)
                bi_sum[i] += (1 - cos).sum().item()
            count += len(ids)
    influence = [b / count for b in bi_sum]

    teacher_nll = _mean_nll(model, batches)
    scored = {}
    for name, idx in _candidates(n_layers, keep, influence).items():
        scored[name] = (idx, _mean_nll(_select(model, idx), batches))
        log.info("depth pruning candidate %-9s layers %s: calibration loss %.3f nats/token (teacher %.3f)", name, idx, scored[name][1], teacher_nll)
    best = min(scored, key=lambda k: scored[k][1])
    keep_idx = scored[best][0]
    student = _select(model, keep_idx)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if (teacher_dir / "generation_config.json").is_file():
        (out / "generation_config.json").write_text((teacher_dir / "generation_config.json").read_text())
    info = {
        "teacher": str(teacher_dir),
        "teacher_layers": n_layers,
        "kept_layers": keep_idx,
        "strategy": best,
        "calibration_tokens": count,
        "calibration_nll": {k: round(v[1], 4) for k, v in scored.items()},
        "calibration_ppl": {k: round(math.exp(min(v[1], 50)), 1) for k, v in scored.items()},
        "teacher_calibration_nll": round(teacher_nll, 4),
        "block_influence": [round(b, 5) for b in influence],
        "teacher_params": sum(p.numel() for p in model.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
    }
    (out / "kdship_prune.json").write_text(json.dumps(info, indent=1))
    return info
