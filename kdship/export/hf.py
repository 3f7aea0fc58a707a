"""The ``hf`` format: a plain Hugging Face folder (safetensors, config, tokenizer, generation config)
that transformers' ``from_pretrained`` and vLLM load as they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kdship.export.onnx import ExportError
from kdship.run_manifest import final_dir

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def resolve_model_dir(run_dir: str | Path) -> Path:
    """A ``kdship train`` run folder (student in RUN_DIR/final/) or an HF model folder -> the HF folder."""
    p = Path(run_dir)
    if not p.exists():
        raise ExportError(f"RUN_DIR not found: {p}")
    if not p.is_dir():
        raise ExportError(f"RUN_DIR must be a folder (a `kdship train` run or an HF model directory), got a file: {p}")
    for cand in (final_dir(p), p):
        if (cand / "config.json").is_file():
            if not any(any(cand.glob(pat)) for pat in WEIGHT_PATTERNS):
                raise ExportError(f"{cand}: config.json but no weights (*.safetensors)")
            return cand
    hint = ""
    ckpts = sorted(x.name for x in p.iterdir() if x.is_dir())
    if ckpts:
        hint = f"; sub-folders there: {', '.join(ckpts[:8])} (an unfinished run has no final/: pass a checkpoint's HF folder)"
    raise ExportError(f"{p}: neither {p / 'final' / 'config.json'} (a finished `kdship train` run) nor {p / 'config.json'} (an HF model folder){hint}")


def export_hf(model_dir: str | Path, out_dir: str | Path, model=None) -> dict[str, Any]:
    """Write the HF folder to ``out_dir`` (replaced atomically: written to ``out_dir.tmp`` first).

    Weights are re-saved with ``save_pretrained(safe_serialization=True)`` (safetensors, sharded when
    large) in the model's own dtype; a generation config is written when the source has none, with
    the tokenizer's EOS/PAD ids, so ``vllm serve`` and ``generate`` stop where the model was taught to.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{model_dir}: cannot load the tokenizer (the export must ship one): {e}") from e
    src_cfg = json.loads((model_dir / "config.json").read_text())
    src_dtype = src_cfg.get("dtype") or src_cfg.get("torch_dtype")
    if model is None or src_dtype not in (None, "float32"):
        # the shared float32 copy is only reused when it is the source's own dtype
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        gen = GenerationConfig.from_pretrained(str(model_dir))
    else:
        gen = GenerationConfig.from_model_config(model.config)
    if gen.eos_token_id is None and tok.eos_token_id is not None:
        gen.eos_token_id = tok.eos_token_id
    if gen.pad_token_id is None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    if gen.bos_token_id is None and tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    model.generation_config = gen
    with torch.no_grad():
        model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    for extra in ("chat_template.jinja",):
        if (model_dir / extra).is_file() and not (tmp / extra).exists():
            shutil.copy2(model_dir / extra, tmp / extra)
    if any(tmp.glob("*.bin")):
        raise ExportError(f"{tmp}: pickle weights were written; expected safetensors only")
    for f in tmp.iterdir():
        f.chmod(0o644)  # save_pretrained's atomic writes leave 0600: a serving container's user must read them
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    files = sorted(x.name for x in out_dir.iterdir())
    cfg = json.loads((out_dir / "config.json").read_text())
    return {
        "dir": str(out_dir),
        "files": files,
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "weight_bytes": sum(x.stat().st_size for x in out_dir.glob("*.safetensors")),
        "eos_token_id": gen.eos_token_id,
    }
