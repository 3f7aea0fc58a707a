"""The cache's overhead: ``kdship cache`` tokens/s divided by plain ``vllm.LLM.generate`` tokens/s.

Same teacher (SmolLM2-135M-Instruct, or the tiny test teacher with --tiny), same prompts, the same
engine work, both engines warm, measured side by side in one process (the machine is shared and noisy,
so the two are interleaved and each measured ``--repeats`` times; the best of each is compared).
kdship writes its default store (headtail targets drawn from vLLM's top-K' candidates, K' =
``--sampled-candidates``, default 4096); plain vLLM is asked for the same K' logprobs, the way kdship's
backend asks (flat logprobs, no detokenisation), and its output is dropped:

* score mode: plain = ``LLM.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=K'))``;
  kdship = ``kdship.cache.run.cache(..., mode="score")`` end to end (read + render + teacher +
  targets + encode + write + commit). tokens = scored positions.
* generate mode: plain = ``LLM.generate(prompts, SamplingParams(max_tokens=M, logprobs=K',
  temperature=1, seed=...))``; kdship = ``cache(..., mode="generate")``. tokens = generated tokens.
Goal (issue 27): ratio >= 0.9. From the same kdship runs' summaries: the engine's stall on the background
shard writer (``writer_stall_seconds`` / wall: time the engine thread waited on a full queue) and the
writer thread's busy share (``writer_busy_seconds`` / wall).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python bench/cache_overhead.py [--tiny] [--rows 48]
Writes bench/results/cache_overhead.md (and bench/results/cache.md); with another --out, that file only.
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
    ap.add_argument("--k", type=int, default=None, help="K': the logprobs asked of the engine (default: kdship cache's --sampled-candidates)")
    ap.add_argument("--repeats", type=int, default=2)
    # one shard: all the prompts in one engine call, as plain vLLM gets them and as a real store's 65k-position
    # shards do (4 shards of these few rows would be 4 small batches: slower for vLLM's batching, not kdship's
    # writing). More shards show the background writer overlapping an engine call with the calls before it.
    ap.add_argument("--shards", type=int, default=1, help="shards per kdship run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache_overhead.md"))
    args = ap.parse_args()

    from vllm import LLM, SamplingParams, TokensPrompt

    from kdship.render import load_tokenizer, render_prompt, render_score
    from kdship.cache.run import DEFAULTS as CACHE_DEFAULTS, cache
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

    from transformers import AutoConfig

    # K' as kdship's backend asks it: at most the vocabulary (kdship.cache.run._candidates_k)
    k, M = min(args.k or int(CACHE_DEFAULTS["sampled_candidates"]), int(AutoConfig.from_pretrained(teacher).vocab_size)), args.max_new_tokens
    # plain vLLM asked for what kdship's backend asks of it (kdship.cache.vllm_backend): K' logprobs, flat, no detokenisation
    bare = LLM(model=teacher, dtype="float32", max_model_len=default_max_model_len(teacher), max_logprobs=max(DEFAULT_MAX_LOGPROBS, k),
               logprobs_mode="raw_logprobs", enforce_eager=True, enable_prefix_caching=False, seed=0, skip_tokenizer_init=True)

    def bare_score():
        t = time.perf_counter()
        bare.generate([TokensPrompt(prompt_token_ids=p) for p in score_prompts],
                      SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, temperature=0.0, detokenize=False), use_tqdm=False)
        return n_score / (time.perf_counter() - t)

    def bare_generate():
        t = time.perf_counter()
        outs = bare.generate([TokensPrompt(prompt_token_ids=p) for p in gen_prompts],
                             [SamplingParams(max_tokens=M, logprobs=k, flat_logprobs=True, detokenize=False, temperature=1.0, seed=i)
                              for i in range(len(gen_prompts))], use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)

    overhead: dict[str, list] = {"score": [], "generate": []}  # kdship's own share of its run time
    writer: dict[str, list] = {"score": [], "generate": []}  # (engine stall on the writer, writer busy) / wall, per run

    def note(mode, s):
        overhead[mode].append(s["writer_overhead_fraction"])
        writer[mode].append((s["writer_stall_seconds"] / s["seconds"], s["writer_busy_seconds"] / s["seconds"]))

    def kd_score():
        t = time.perf_counter()
        s = cache(teacher, str(work / "chats.jsonl"), str(work / "s_score"), sampled_candidates=k, max_length=512, overflow="truncate", overwrite=True, progress=False, shard_size=-(-args.rows // args.shards))
        note("score", s)
        return s["positions"] - s["samples"], (s["positions"] - s["samples"]) / (time.perf_counter() - t)

    def kd_generate():
        t = time.perf_counter()
        s = cache(teacher, str(work / "prompts.jsonl"), str(work / "s_gen"), mode="generate", sampled_candidates=k, max_new_tokens=M, overwrite=True, progress=False, shard_size=-(-args.gen_rows // args.shards))
        note("generate", s)
        return s["generated_tokens"], s["generated_tokens"] / (time.perf_counter() - t)

    # warm both engines (kdship's is built by its first call; the sampler compiles on first use)
    bare.generate([TokensPrompt(prompt_token_ids=score_prompts[0])], SamplingParams(max_tokens=2, prompt_logprobs=k, logprobs=k, detokenize=False), use_tqdm=False)
    cache(teacher, str(work / "prompts.jsonl"), str(work / "warm"), mode="generate", sampled_candidates=k, max_new_tokens=2, progress=False)
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
        f"Machine: {_machine()}. Teacher: {tname}, vLLM {__import__('vllm').__version__} CPU, float32, in-process engine, K'={k} logprobs asked of "
        "both (kdship: its default headtail store drawn from them; plain vLLM: the same request, flat logprobs, no detokenisation). "
        f"Score mode: {len(score_prompts)} chat rows, {n_score} scored positions; generate mode: {len(gen_prompts)} prompts x {M} new tokens. "
        f"Best of {args.repeats} interleaved runs each. kdship = the whole `cache()` call (read, render, teacher, parse, encode, write, commit), "
        f"{args.shards} shards per run.",
        "",
        "| mode | plain vLLM tokens/s | kdship cache tokens/s | ratio (goal >= 0.9) | kdship time outside the engine call "
        "| engine stalled on the writer | writer thread busy |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("score", "generate"):
        b, kd = max(res[mode]["bare"]), max(res[mode]["kdship"])
        frac = float(np.mean(overhead[mode]))
        stall, busy = np.mean(writer[mode], axis=0)
        lines.append(f"| {mode} | {b:.1f} | {kd:.1f} | {kd / b:.2f} | {100 * frac:.1f} % | {100 * stall:.1f} % | {100 * busy:.1f} % |")
    lines += ["", "The column 'kdship time outside the engine call' is measured inside the same kdship run (time in the backend's score/generate call vs the whole "
              "`cache()` call: reading, rendering, parsing logprobs, encoding, writing, committing), so it is far less exposed to the "
              "machine's noise than the ratio of two separate runs. The last two (share of the `cache()` call's wall time, mean "
              "of the runs): the engine thread's wait on a full queue of the background shard writer (targets, encoding, "
              "writing, committing run there, overlapping the next engine call), and that thread's own busy time.", "",
              "All overhead fractions: `" + json.dumps(overhead) + "`", "", "All runs (tokens/s): `" + json.dumps({m: {w: [round(x, 1) for x in v] for w, v in d.items()} for m, d in res.items()}) + "`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    if Path(args.out).resolve() == Path(ap.get_default("out")).resolve():  # another --out (a trial run) leaves bench/results alone
        merge_results()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
