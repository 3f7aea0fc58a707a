"""The vLLM engine, one per process and settings: the runtime under `kdship cache` (teacher targets),
`kdship export` (the student's KL through vLLM) and the demo.

``get_engine`` keeps one ``vllm.LLM`` per process and settings, so a test suite or a long-lived
process starts vLLM once. On the CPU run it in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
start-up ~4 s) or under ``if __name__ == "__main__":`` (vLLM spawns its engine process). Settings
that matter for distillation targets are explained in ``kdship.cache.vllm_backend``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_ENGINES: dict[tuple, Any] = {}

# Engines are built with a generous logprob cap so that one engine serves every k a run asks for.
DEFAULT_MAX_LOGPROBS = 256


class TeacherUnsupported(RuntimeError):
    """The teacher cannot run on this device with vLLM; the message says why."""


def on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # noqa: BLE001
        import torch

        return not torch.cuda.is_available()


def check_teacher_runs(model_dir: str) -> None:
    """Refuse, naming why, a teacher vLLM's kernels on this device cannot run."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        return  # hub ids: vLLM resolves them itself
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None)
    if head_dim and on_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        ok = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in ok:
            raise TeacherUnsupported(
                f"{model_dir}: head_dim={head_dim}, but vLLM's CPU attention kernels support head sizes {ok} only "
                "(multiples of 32). Use --backend hf for this teacher on this machine, or a GPU."
            )


def default_max_model_len(model_dir: str, cap: int = 4096) -> int:
    cfg_file = Path(model_dir) / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg = cfg.get("text_config", cfg)
        return int(min(cap, cfg.get("max_position_embeddings", cap)))
    return cap


def engine_dtype(dtype: str) -> str:
    """The dtype vLLM is given for ``--dtype``: auto is float32 on the CPU (bf16 is slow there and
    ~0.07 nat off) and "auto" on a GPU (vLLM's choice from the model config); explicit names as given."""
    if dtype != "auto":
        return dtype
    return "float32" if on_cpu() else "auto"


def get_engine(
    model_dir: str,
    max_model_len: int | None = None,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    seed: int = 0,
    **extra: Any,
):
    """One ``vllm.LLM`` per (process, settings): built on first use, then reused.

    ``dtype``: as ``engine_dtype`` resolves it.
    """
    check_teacher_runs(model_dir)
    cpu = on_cpu()
    dtype = engine_dtype(dtype)
    max_model_len = max_model_len or default_max_model_len(model_dir)
    key = (str(model_dir), max_model_len, max_logprobs, dtype, tensor_parallel_size, seed, tuple(sorted(extra.items())))
    if key in _ENGINES:
        return _ENGINES[key]
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    # kdship passes token ids (skip_tokenizer_init): vLLM's chat-template warm-up then logs a
    # harmless traceback at start-up; drop that one record
    import logging

    logging.getLogger("vllm.renderers.base").addFilter(lambda r: "Chat template warmup failed" not in r.getMessage())
    kwargs = dict(
        model=str(model_dir),
        dtype=dtype,
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        logprobs_mode="raw_logprobs",
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
        tensor_parallel_size=tensor_parallel_size,
        seed=seed,
    )
    if cpu:
        kwargs["enforce_eager"] = True  # graph capture costs ~50 s of start-up on the CPU for little gain
    kwargs.update(extra)
    llm = LLM(**kwargs)
    _ENGINES[key] = llm
    return llm


def close_engines() -> None:
    _ENGINES.clear()
    import gc

    gc.collect()
