"""The cache writer's overhead: ``kdship cache`` tokens/s divided by bare ``vllm.LLM.generate`` tokens/s.

Same teacher (SmolLM2-135M-Instruct, or the tiny test teacher with --tiny), same prompts, same k,
both engines warm, measured side by side in one process (the machine is shared and noisy, so the
two are interleaved and each measured ``--repeats`` times; the best of each is compared).

* score mode: bare = ``LLM.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=k))``;
  kdship = ``kdship.cache.run.cache(..., mode="score")`` end to end (read + render + teacher +
  parse + encode + write + commit). tokens = scored positions.
* generate mode: bare = ``LLM.generate(prompts, SamplingParams(max_tokens=M, logprobs=k,
  temperature=1, seed=...))``; kdship = ``cache(..., mode="generate")``. tokens = generated tokens.
Goal: ratio >= 0.95.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python bench/cache_overhead.py [--tiny] [--rows 48]
Writes bench/results/cache_overhead.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def _machine() -> str:
    """Cores, CPU and the load now, measured (bench/run_all.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from run_all import machine_with_load

    return machine_with_load()


def merge_results() -> None:
    """bench/results/cache.md = every cache_*.md section (each script writes its own)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from run_all import combine_area

    combine_area("cache")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test teacher instead of SmolLM2")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--gen-rows", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache_overhead.md"))
    args = ap.parse_args()

    from vllm import LLM, SamplingParams, TokensPrompt

    from kdship.render import load_tokenizer, render_prompt, render_score
    from kdship.cache.run import cache
    from kdship.runtime.vllm_engine import DEFAULT_MAX_LOGPROBS, default_max_model_len
    from kdship.data import read_rows
    from kdship.demo.assets import chitchat_conversations
    from kdship.tiny import write_jsonl

    work = Path(tempfile.mkdtemp(prefix="kdship-overhead-"))
    if args.tiny:
        from kdship.tiny import build_tiny_llama

        teacher, tname = str(build_tiny_llama(work / "tiny", hidden=128, layers=2, heads=2, kv_heads=1)), "tiny test teacher"
    else:
        from kdship.demo.assets import smollm2_dir

        teacher, tname = str(smollm2_dir()), "SmolLM2-135M-Instruct"
    convs = chitchat_conversations()
    chats = [{"messages": [{"role": ("user", "assistant")[j % 2], "content": t} for j, t in enumerate(c[:4][: len(c[:4]) // 2 * 2])]} for c in convs[: args.rows]]
    write_jsonl(work / "chats.jsonl", chats)
    write_jsonl(work / "prompts.jsonl", [{"prompt": c[0]} for c in convs[1000 : 1000 + args.gen_rows]])
    tok = load_tokenizer(teacher)
    score_prompts = [render_score(r, tok)[0][:512].tolist() for r in read_rows(work / "chats.jsonl")[0]]
    gen_prompts = [render_prompt(r, tok)[:256] for r in read_rows(work / "prompts.jsonl")[0]]
    n_score = sum(len(p) - 1 for p in score_prompts)

    # bare vLLM, as a user would call it (default tokenizer init and detokenisation, dict logprobs)
    bare = LLM(model=teacher, dtype="float32", max_model_len=default_max_model_len(teacher), max_logprobs=DEFAULT_MAX_LOGPROBS,
               logprobs_mode="raw_logprobs", enforce_eager=True, enable_prefix_caching=False, seed=0)
    k, M = args.k, args.max_new_tokens

    def bare_score():
        t = time.perf_counter()
        bare.generate([TokensPrompt(prompt_token_ids=p) for p in score_prompts], SamplingParams(max_tokens=1, prompt_logprobs=k), use_tqdm=False)
        return n_score / (time.perf_counter() - t)

    def bare_generate():
        t = time.perf_counter()
        outs = bare.generate([TokensPrompt(prompt_token_ids=p) for p in gen_prompts],
                             [SamplingParams(max_tokens=M, logprobs=k, temperature=1.0, seed=i) for i in range(len(gen_prompts))], use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)

    overhead: dict[str, list] = {"score": [], "generate": []}  # kdship's own share of its run time

    def kd_score():
        t = time.perf_counter()
        s = cache(teacher, str(work / "chats.jsonl"), str(work / "s_score"), top_k=k, max_length=512, overflow="truncate", overwrite=True, progress=False, shard_size=args.rows)
        overhead["score"].append(s["writer_overhead_fraction"])
        return s["positions"] - s["samples"], (s["positions"] - s["samples"]) / (time.perf_counter() - t)

    def kd_generate():
        t = time.perf_counter()
        s = cache(teacher, str(work / "prompts.jsonl"), str(work / "s_gen"), mode="generate", top_k=k, max_new_tokens=M, overwrite=True, progress=False, shard_size=args.gen_rows)
        overhead["generate"].append(s["writer_overhead_fraction"])
        return s["generated_tokens"], s["generated_tokens"] / (time.perf_counter() - t)

    # warm both engines (kdship's is built by its first call; the sampler compiles on first use)
    bare.generate([TokensPrompt(prompt_token_ids=score_prompts[0])], SamplingParams(max_tokens=2, prompt_logprobs=k, logprobs=k), use_tqdm=False)
    cache(teacher, str(work / "prompts.jsonl"), str(work / "warm"), mode="generate", top_k=k, max_new_tokens=2, progress=False)
    res = {"score": {"bare": [], "kdship": []}, "generate": {"bare": [], "kdship": []}}
    for r in range(args.repeats):
        res["score"]["bare"].append(bare_score())
        res["score"]["kdship"].append(kd_score()[1])
        res["generate"]["kdship"].append(kd_generate()[1])
        res["generate"]["bare"].append(bare_generate())
        print(json.dumps(res), flush=True)
    lines = [
        "## Cache writer overhead (bench/cache_overhead.py)",
        "",
        f"Machine: {_machine()}. Teacher: {tname}, vLLM {__import__('vllm').__version__} CPU, float32, in-process engine, k={k}. "
        f"Score mode: {len(score_prompts)} chat rows, {n_score} scored positions; generate mode: {len(gen_prompts)} prompts x {M} new tokens. "
        f"Best of {args.repeats} interleaved runs each. kdship = the whole `cache()` call (read, render, teacher, parse, encode, write, commit).",
        "",
        "| mode | bare vLLM tokens/s | kdship cache tokens/s | ratio (goal >= 0.95) | kdship time outside the engine call |",
        "|---|---|---|---|---|",
    ]
    for mode in ("score", "generate"):
        b, kd = max(res[mode]["bare"]), max(res[mode]["kdship"])
        frac = float(np.mean(overhead[mode]))
        lines.append(f"| {mode} | {b:.1f} | {kd:.1f} | {kd / b:.2f} | {100 * frac:.1f} % |")
    lines += ["", "The last column is measured inside the same kdship run (time in the backend's score/generate call vs the whole "
              "`cache()` call: reading, rendering, parsing logprobs, encoding, writing, committing), so it is far less exposed to the "
              "machine's noise than the ratio of two separate runs.", "",
              "All overhead fractions: `" + json.dumps(overhead) + "`", "", "All runs (tokens/s): `" + json.dumps({m: {w: [round(x, 1) for x in v] for w, v in d.items()} for m, d in res.items()}) + "`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    merge_results()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
