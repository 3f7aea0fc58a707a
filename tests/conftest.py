"""Shared fixtures: a tiny Llama teacher built locally, corpora in every input format.

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): start-up drops from ~40 s to a few seconds
and one engine per (model, settings) is reused across the whole suite (see kdship.cache.vllm_backend).
"""

import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from kdship.tiny import build_tiny_llama, synthetic_sentences, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A 2-layer Llama, hidden 128, 2 heads of 64 (vLLM CPU needs head_dim >= 32), vocab ~512."""
    return build_tiny_llama(tmp_path_factory.mktemp("teacher") / "teacher", hidden=128, layers=2, heads=2, kv_heads=1, seed=0)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tiny_teacher):
    """A 1-layer student sharing the teacher's tokenizer."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("student") / "student", hidden=64, layers=1, heads=1, kv_heads=1, seed=1, init_range=0.02, tokenizer_dir=tiny_teacher
    )


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    sents = synthetic_sentences(200, seed=7)
    write_jsonl(d / "text.jsonl", [{"text": " ".join(sents[i : i + 3])} for i in range(0, 60, 3)])
    write_jsonl(d / "pairs.jsonl", [{"prompt": sents[i], "response": sents[i + 1]} for i in range(60, 100, 2)])
    write_jsonl(
        d / "chat.jsonl",
        [{"messages": [{"role": "user", "content": sents[i]}, {"role": "assistant", "content": sents[i + 1]}]} for i in range(100, 130, 2)],
    )
    write_jsonl(d / "prompts.jsonl", [{"prompt": sents[i]} for i in range(130, 140)])
    return d


@pytest.fixture(scope="session")
def run_isolated():
    """``run_isolated(code, cwd)``: ``python -I -c code`` (isolated: the repository, and so kdship, is not
    importable from the cwd), with only zarr's and numpy's own install folders put on its path, so it
    also works where they were installed beside the interpreter's (PYTHONPATH, ``pip --target``)."""
    import subprocess
    import sys

    import numcodecs
    import numpy
    import zarr

    dirs = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (zarr, numcodecs, numpy)})
    prefix = f"import sys; sys.path[:0] = {dirs!r}\n"

    def run(code: str, cwd) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-I", "-c", prefix + code], capture_output=True, text=True, cwd=cwd, timeout=120)

    return run


from s3_stores import s3  # noqa: E402,F401 - the moto S3 server fixture, shared by the object-store tests
