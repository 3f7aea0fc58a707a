"""Black-box teacher overhead: generated positions/s through vLLM's OpenAI server + kdship's
OpenAIBackend (HTTP, JSON logprobs) vs the same engine in-process (kdship's VLLMBackend), same
prompts, greedy, same k. Also checks that both give the same tokens and logprobs.

    .venv/bin/python bench/eval_blackbox.py [--prompts 32] [--new-tokens 32] [--k 20]

Writes bench/results/eval_blackbox.md. The tiny local teacher (kdship.tiny) is used: per-step
overhead dominates on it, which is exactly what the HTTP path adds to.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402



def _machine() -> str:
    """Cores, CPU and the load now, measured (bench/run_all.py), never typed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import machine_with_load

    return machine_with_load()

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from kdship.cache.openai_backend import OpenAIBackend
    from kdship.cache.vllm_backend import VLLMBackend
    from kdship.tiny import build_tiny_llama, synthetic_sentences

    work = Path(tempfile.mkdtemp(prefix="kdship_bench_bb_"))
    teacher = build_tiny_llama(work / "teacher", seed=0)
    tok = AutoTokenizer.from_pretrained(teacher)
    prompts = [tok(s)["input_ids"] for s in synthetic_sentences(args.prompts, seed=5)]
    gen_kw = dict(top_k=args.k, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=args.new_tokens, seeds=[0] * len(prompts))

    port = _port()
    log = open(work / "server.log", "wb")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher), "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0"], stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 600:
                    raise SystemExit(f"server failed; see {work / 'server.log'}")
                time.sleep(0.5)
        startup = time.time() - t0
        be = OpenAIBackend(f"http://127.0.0.1:{port}", tokenizer=teacher, top_logprobs=args.k, max_concurrency=args.concurrency)
        be.generate(prompts[:2], **{**gen_kw, "seeds": [0, 0]})  # warm-up (sampler compile)
        t = time.perf_counter()
        http_out = be.generate(prompts, **gen_kw)
        http_s = time.perf_counter() - t
        be.close()
    finally:
        proc.terminate()
        proc.wait(60)

    local = VLLMBackend(str(teacher), max_model_len=256, max_logprobs=max(20, args.k), dtype="float32")
    local.generate(prompts[:2], **{**gen_kw, "seeds": [0, 0]})
    t = time.perf_counter()
    local_out = local.generate(prompts, **gen_kw)
    local_s = time.perf_counter() - t

    positions = sum(len(g[0].token_ids) for g in http_out)
    same_tokens = all(a[0].token_ids == b[0].token_ids for a, b in zip(http_out, local_out))
    diffs = [np.abs(a[0].topk_logprobs - b[0].topk_logprobs).max() for a, b in zip(http_out, local_out) if a[0].token_ids == b[0].token_ids and len(a[0].token_ids)]
    lines = [
        "# Black-box teacher: OpenAI HTTP backend vs in-process vLLM",
        "",
        f"Machine: {_machine()}.",
        f"Tiny teacher (2 layers, hidden 128, vocab {len(tok)}), {len(prompts)} prompts, greedy, {args.new_tokens} new tokens max, k={args.k}, "
        f"HTTP concurrency {args.concurrency}.",
        "",
        "| path | positions | seconds | positions/s |",
        "|---|---:|---:|---:|",
        f"| vLLM in-process (VLLMBackend) | {sum(len(g[0].token_ids) for g in local_out)} | {local_s:.2f} | {sum(len(g[0].token_ids) for g in local_out) / local_s:.1f} |",
        f"| vLLM OpenAI server + OpenAIBackend | {positions} | {http_s:.2f} | {positions / http_s:.1f} |",
        "",
        f"Ratio HTTP / in-process throughput: **{(positions / http_s) / (sum(len(g[0].token_ids) for g in local_out) / local_s):.2f}**. "
        f"Server start-up to /health: {startup:.0f} s.",
        f"Same greedy tokens on every prompt: {same_tokens}; max |logprob difference| over the top-{args.k}: {max(diffs) if diffs else float('nan'):.2e}.",
    ]
    out = Path(__file__).parent / "results" / "eval_blackbox.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
