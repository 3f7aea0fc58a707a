"""``kdship student``: a student initialised from the teacher by pruning (depth, then width), Minitron style.

Depth first (``kdship.student.depth``: which layers to keep, by Block Influence and calibration loss),
then width on the depth-pruned model (``kdship.student.width``: hidden channels, MLP neurons and
attention heads by activation importance measured on that model, so the ranking sees the layers the
student keeps). The output is an HF directory: config.json, model.safetensors, the teacher's tokenizer
and generation config, and ``kdship_prune.json`` (what was kept and why).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from kdship.student.calibration import calibration_sequences
from kdship.student.depth import depth_prune
from kdship.student.width import LLAMA_MODEL_TYPES, StudentError, allowed_heads, collect_importance, head_mode, plan_width, width_prune

log = logging.getLogger("kdship.student")

PRUNE_FILE = "kdship_prune.json"
DEFAULTS: dict[str, Any] = {
    "out": None,
    "layers": None,
    "hidden": None,
    "intermediate": None,
    "heads": None,
    "calibration": None,
    "hidden_basis": "pca",  # narrowed hidden size: keep the residual stream's principal components (kdship.student.rotate) or its channels
    "calibration_tokens": 2048,
    "max_length": 512,
    "overwrite": False,
    "progress": True,
}


def check_shapes(tcfg, layers: int, hidden: int | None, intermediate: int | None, heads: int | None) -> None:
    """Refuse shapes the architecture cannot take, naming the flag and the value."""
    n, H = tcfg.num_hidden_layers, tcfg.hidden_size
    A = tcfg.num_attention_heads
    kv = getattr(tcfg, "num_key_value_heads", None) or A
    head_dim = getattr(tcfg, "head_dim", None) or H // A
    if not 1 <= layers <= n:
        raise StudentError(f"--layers {layers}: must be between 1 and {n} (the teacher has {n} layers)")
    if (hidden, intermediate, heads) != (None, None, None) and tcfg.model_type not in LLAMA_MODEL_TYPES:
        raise StudentError(
            f"--hidden/--intermediate/--heads: width pruning supports Llama-family teachers (LlamaForCausalLM); "
            f"this teacher is model_type {tcfg.model_type!r} ({', '.join(tcfg.architectures or [])}). Depth pruning (--layers alone) works."
        )
    if hidden is not None and not (1 <= hidden <= H and hidden % head_dim == 0):
        raise StudentError(f"--hidden {hidden}: must be a multiple of the teacher's head_dim {head_dim} between {head_dim} and {H} (the teacher's hidden size)")
    if intermediate is not None and not 1 <= intermediate <= tcfg.intermediate_size:
        raise StudentError(f"--intermediate {intermediate}: must be between 1 and {tcfg.intermediate_size} (the teacher's MLP width)")
    if heads is not None:
        if not 1 <= heads <= A:
            raise StudentError(f"--heads {heads}: must be between 1 and {A} (the teacher's attention heads)")
        head_mode(A, kv, heads)
    h, a = hidden or H, heads or A
    if h % a:
        # transformers' config validation refuses it when the student loads (even with an explicit head_dim)
        fits = [x for x in allowed_heads(A, kv) if h % x == 0]
        raise StudentError(
            f"--hidden {h} with --heads {a}: transformers requires the hidden size to be a multiple of the query heads; "
            f"with --hidden {h} choose --heads among {fits}, or a hidden size that {a} divides"
        )


def student(
    teacher: str | Path,
    out: str | Path | None = None,
    layers: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    calibration: str | Path | Sequence[str] | None = None,
    config: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write a pruned copy of ``teacher`` to ``out``; return (and write to ``out/kdship_prune.json``) the summary.

    ``calibration``: a data file ``kdship cache`` reads, a kdship store, or a list of texts. Options:
    ``calibration_tokens``, ``max_length``, ``overwrite``, ``progress`` (see ``DEFAULTS``). Flags
    given here win over the YAML ``config``, which wins over ``DEFAULTS``.
    """
    from transformers import AutoConfig

    from kdship.config import resolve

    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise StudentError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
    flags = dict(out=out, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, calibration=calibration, **options)
    cfg = resolve(DEFAULTS, config, flags)
    for flag in ("out", "layers", "calibration"):
        if cfg[flag] is None:
            raise StudentError(f"--{flag} is required")
    teacher, out = Path(teacher), Path(cfg["out"])
    if not (teacher / "config.json").is_file():
        raise StudentError(f"TEACHER {teacher}: not an HF model directory (no config.json)")
    tcfg = AutoConfig.from_pretrained(teacher)
    check_shapes(tcfg, cfg["layers"], cfg["hidden"], cfg["intermediate"], cfg["heads"])
    if cfg["hidden_basis"] not in ("pca", "channels"):
        raise StudentError(f"--hidden-basis {cfg['hidden_basis']!r}: choose pca or channels")
    if (out / "config.json").exists() and not cfg["overwrite"]:
        raise StudentError(f"--out {out}: already holds a model; pass --overwrite to replace it")
    return _prune_and_save(teacher, out, cfg)


def _prune_and_save(teacher: Path, out: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    batches, source = calibration_sequences(cfg["calibration"], tok, cfg["calibration_tokens"], cfg["max_length"])
    pruned, info = depth_prune(model, cfg["layers"], batches)
    width = {k: cfg[k] for k in ("hidden", "intermediate", "heads")}
    if any(v is not None for v in width.values()):
        pc = pruned.config
        log.info("width pruning to hidden %s, intermediate %s, heads %s", width["hidden"], width["intermediate"], width["heads"])
        rotated = None
        if cfg["hidden_basis"] == "pca" and width["hidden"] is not None and width["hidden"] < pc.hidden_size:
            from kdship.student.rotate import rotate_hidden

            pruned, rotated = rotate_hidden(pruned, batches)
        imp = collect_importance(pruned, batches, progress=cfg["progress"])
        plan = plan_width(
            imp, pc, width["hidden"] or pc.hidden_size, width["intermediate"] or pc.intermediate_size, width["heads"] or pc.num_attention_heads
        )
        pruned, scaled = width_prune(pruned, plan, imp)
        info["width"] = {**width_summary(imp, plan), **scaled, "hidden_basis": rotated or {"basis": "channels"}}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pruned.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if (teacher / "generation_config.json").is_file():
        shutil.copyfile(teacher / "generation_config.json", out / "generation_config.json")
    sc = pruned.config
    info = {
        "teacher": str(teacher),
        **info,
        "calibration": source,
        "calibration_tokens": sum(len(b) for b in batches),
        "shape": {k: getattr(sc, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")},
        "teacher_params": sum(p.numel() for p in model.parameters()),
        "student_params": sum(p.numel() for p in pruned.parameters()),
    }
    (out / PRUNE_FILE).write_text(json.dumps(info, indent=1))
    log.info("student: %s (%.1f M parameters, teacher %.1f M)", out, info["student_params"] / 1e6, info["teacher_params"] / 1e6)
    return info


def width_summary(imp, plan) -> dict[str, Any]:
    """What width pruning kept, and the share of the measured importance that it keeps."""

    def share(scores, kept) -> float:
        total = float(scores.sum())
        return round(float(scores[kept].sum()) / total, 4) if total > 0 else 1.0

    return {
        "hidden": {"kept": len(plan.hidden), "of": len(imp.hidden), "importance_kept": share(imp.hidden, plan.hidden), "channels": plan.hidden},
        "intermediate": {
            "kept": len(plan.neurons[0]),
            "of": len(imp.neurons[0]),
            "importance_kept": [share(s, k) for s, k in zip(imp.neurons, plan.neurons)],
            "neurons": plan.neurons,
        },
        "heads": {
            "mode": plan.head_mode,
            "kept": len(plan.q_heads[0]),
            "of": len(imp.heads[0]),
            "query_heads": plan.q_heads,
            "kv_heads": plan.kv_heads,
            "scores": [[round(float(x), 5) for x in s] for s in imp.heads],
        },
        "calibration_tokens": imp.tokens,
    }
