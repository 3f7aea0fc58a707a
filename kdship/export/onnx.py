"""Export a decoder-only HF causal LM to ONNX with KV-cache inputs/outputs (one graph for
prefill and decode), and its dynamic int8 variant.

Path chosen: ``torch.onnx.export(dynamo=True)`` of a small wrapper that takes
``input_ids, attention_mask, position_ids, *past`` as plain tensors and rebuilds a transformers
``DynamicCache`` inside (see docs/export.md for why this one and not transformers' experimental
exporter, the legacy TorchScript exporter or optimum). Dynamic axes: ``batch``, ``seq``
(new tokens), ``past_seq`` (cached tokens) and ``total_seq`` for the mask (its own dim: writing it
as past_seq + seq makes torch.export fail).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from kdship.runtime.onnx import META_FILE

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 18
# Above this many parameter bytes the weights go to an external data file (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


class ExportError(RuntimeError):
    """An export that cannot be done as asked; the message names the model folder or file."""


def kv_shape_info(config) -> dict[str, int]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return {
        "num_layers": int(text.num_hidden_layers),
        "num_attention_heads": heads,
        "num_kv_heads": kv,
        "head_dim": head_dim,
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(text.vocab_size),
        "max_position_embeddings": int(getattr(text, "max_position_embeddings", 0) or 0),
    }


def io_names(num_layers: int) -> dict[str, list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return {
        "input_names": ["input_ids", "attention_mask", "position_ids", *past],
        "output_names": ["logits", *present],
        "past_names": past,
        "present_names": present,
    }


def _check_supported(config, model_dir: Path) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ExportError(
            f"{model_dir}: layer types {sorted(set(layer_types))} need a sliding-window/hybrid cache; "
            "the ONNX export supports full-attention decoders (Llama, Qwen2/3, Mistral without sliding window)"
        )


def load_for_export(model_dir: str | Path, attn_implementation: str = "sdpa"):
    """Load the HF model in float32, eval mode, on the CPU (export traces on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn_implementation)
    except (ValueError, ImportError) as e:
        if attn_implementation == "eager":
            raise ExportError(f"{model_dir}: cannot load as a causal LM: {e}") from e
        log.info("%s: %s attention unavailable (%s); using eager", model_dir, attn_implementation, e)
        return load_for_export(model_dir, "eager")
    return model.eval()


def export_onnx(model_dir: str | Path, out_dir: str | Path, model=None, source: str | None = None) -> dict[str, Any]:
    """Write ``out_dir/model.onnx``, ``kdship_onnx.json`` and the tokenizer files; return the metadata.

    The graph is float32 (fp16 weights gave no speed-up on the CPU, see docs/export.md).
    """
    import warnings

    import torch

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_for_export(model_dir)
    model = model.to("cpu", torch.float32).eval()
    config = model.config
    _check_supported(config, model_dir)
    info = kv_shape_info(config)
    names = io_names(info["num_layers"])
    sample_inputs, dynamic_shapes = _trace_inputs(info)
    external = sum(t.numel() * t.element_size() for t in model.parameters()) > EXTERNAL_DATA_BYTES
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                _decoder_with_cache(model),
                sample_inputs,
                str(out_dir / ONNX_FILE),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=names["input_names"],
                output_names=names["output_names"],
                opset_version=OPSET,
                optimize=True,
                external_data=external,
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - re-raised naming the model
            raise ExportError(f"{model_dir}: torch.onnx.export(dynamo=True) failed for {type(model).__name__}: {e}") from e
    export_s = time.perf_counter() - t0
    copied = copy_tokenizer_files(model_dir, out_dir)
    meta = _onnx_meta(model, info, names, external, copied, source or str(model_dir), export_s)
    write_meta(out_dir, meta)
    return meta


def _decoder_with_cache(model):
    """``model`` as (input_ids, attention_mask, position_ids, past) -> (logits, *present), tensors only:
    the KV cache goes in and out as a flat list of key/value tensors, two per layer."""
    import torch
    from transformers import DynamicCache

    config = model.config
    n_layers = kv_shape_info(config)["num_layers"]

    class DecoderWithCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)], config=config)
            out = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache, use_cache=True
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithCache(model)


def _trace_inputs(info: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Sample inputs for tracing and their dynamic dimensions. The sample sizes are all distinct and
    > 1 so that no dynamic dimension is specialised to a constant; one row is left-padded so that the
    mask path is traced as it is used."""
    import torch
    from torch.export import Dim

    n_layers, b, s, p = info["num_layers"], 2, 3, 5
    kv, hd = info["num_kv_heads"], info["head_dim"]
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, info["vocab_size"], (b, s), generator=g)
    attention_mask = torch.ones(b, p + s, dtype=torch.int64)
    attention_mask[1, :2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]
    past = [torch.randn(b, kv, p, hd, generator=g) for _ in range(2 * n_layers)]
    B, S, P, T = Dim("batch"), Dim("seq"), Dim("past_seq"), Dim("total_seq")
    dynamic_shapes = {
        "input_ids": {0: B, 1: S},
        "attention_mask": {0: B, 1: T},
        "position_ids": {0: B, 1: S},
        "past": [{0: B, 2: P} for _ in range(2 * n_layers)],
    }
    return (input_ids, attention_mask, position_ids, past), dynamic_shapes


def _onnx_meta(model, info: dict[str, Any], names: dict[str, Any], external: bool, copied: list, source: str, export_s: float) -> dict[str, Any]:
    """``kdship_onnx.json``: what the runtime needs to drive the graph (I/O names, KV shapes, padding,
    special tokens) and where it came from."""
    import torch

    config = model.config
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = config.eos_token_id
    return {
        "format": "kdship-onnx",
        "format_version": 1,
        "files": {"fp32": ONNX_FILE},
        "external_data": external,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}, opset {OPSET}",
        "model_type": getattr(config, "model_type", None),
        "architecture": type(model).__name__,
        "source": source,
        **info,
        **names,
        "dtype": "float32",
        "dynamic_axes": {"batch": "input_ids[0]", "seq": "input_ids[1]", "past_seq": "past[2]", "total_seq": "attention_mask[1]"},
        "past_shape": ["batch", "num_kv_heads", "past_seq", "head_dim"],
        "padding_side": "left",
        "position_ids": "cumsum(attention_mask) - 1, clipped at 0",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
        "tokenizer_files": copied,
        "num_parameters": int(sum(t.numel() for t in model.parameters())),
        "export_seconds": round(export_s, 2),
    }


def write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    tmp = out_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out_dir / META_FILE)


def copy_tokenizer_files(model_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ExportError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer.model / vocab.json); the ONNX folder must be self-contained")
    return copied


def quantize_int8(out_dir: str | Path) -> dict[str, Any]:
    """Dynamic int8 weights for the MatMuls (activations quantised at run time) -> model.int8.onnx.

    Returns timing and sizes; updates kdship_onnx.json's ``files``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir = Path(out_dir)
    src, dst = out_dir / ONNX_FILE, out_dir / INT8_FILE
    if not src.is_file():
        raise ExportError(f"{src}: missing; int8 quantisation needs the fp32 ONNX export first")
    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
    meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    meta["files"]["int8"] = INT8_FILE
    meta["int8"] = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": True, "ops": ["MatMul", "Gemm"]}
    write_meta(out_dir, meta)
    return {"seconds": round(time.perf_counter() - t0, 2), "fp32_bytes": _onnx_bytes(src), "int8_bytes": _onnx_bytes(dst)}


def _onnx_bytes(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)
