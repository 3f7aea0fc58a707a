"""The ONNX endpoint under 200 concurrent requests on loopback: all answered? p99? batching's gain?

Builds a ~10M-parameter random Llama (hidden 512, 4 layers; the tiny test model is so small that
per-request HTTP overhead would hide the model), exports it with ``kdship.export``, then for
``--max-batch`` 1 (one request at a time), 16 and 64 starts ``kdship serve --backend onnx`` and fires 200
concurrent streaming completions (``kdship profile`` at concurrency 200: 32-word prompts,
16 output tokens, greedy, ignore_eos), and also times the batching engine alone (in-process, no HTTP)
on the same requests. Ratios are measured side by side in one run.

    .venv/bin/python bench/serve_load.py [--requests 200] [--output-tokens 16] [--work DIR]

Writes bench/results/serve_load.md, merged into serve.md (+ the profile report in bench/results/serve_profile/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def _machine() -> str:
    """Cores, CPU and the load now, measured (bench/run_all.py), never typed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import machine_with_load

    return machine_with_load()

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,16,64", help="--max-batch values to compare (1 = one at a time)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()

    from kdship.profile.run import profile
    from kdship.tiny import build_tiny_llama

    work = Path(args.work or tempfile.mkdtemp(prefix="kdship-serve-bench-"))
    model_dir = work / "model"
    export_dir = work / "export"
    t0 = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir, hidden=args.hidden, layers=args.layers, heads=args.hidden // 64, kv_heads=max(1, args.hidden // 256), seed=0, init_range=0.02)
    if not (export_dir / "onnx" / "kdship_onnx.json").is_file():
        from kdship.export.run import export

        export(model_dir, export_dir, formats=("onnx",), verify=False)
    meta = json.loads((export_dir / "onnx" / "kdship_onnx.json").read_text())
    n_params = meta.get("num_parameters")
    print(f"model ready in {time.perf_counter() - t0:.0f} s ({n_params} parameters)")

    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]
    engine_rows = engine_only(export_dir / "onnx", batches, args.requests, args.prompt_tokens, args.output_tokens)
    targets = [
        {"name": f"max_batch={b}", "model": str(export_dir), "backend": "onnx", "serve_options": {"max_batch": b, "max_queue": max(256, args.requests)}}
        for b in batches
    ]
    rep = profile(
        targets,
        concurrency=(args.requests,),
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        out=RESULTS / "serve_profile",
        max_seconds=1800,
        warmup=2,
    )
    load_after = os.getloadavg()[0]
    rows = []
    base = None
    for b in batches:
        lv = rep["targets"][f"max_batch={b}"]["levels"][0]
        if b == 1:
            base = lv["output_tokens_per_s"]
        rows.append((b, lv))

    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f}"

    lines = [
        "## ONNX endpoint under load (bench/serve_load.py)",
        "",
        f"Machine: {_machine()} ({platform.platform()}). "
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `.venv/bin/python bench/serve_load.py`; "
        f"1-minute load average {load_before:.1f} at the start, {load_after:.1f} at the end.",
        "",
        f"Model: random Llama, hidden {args.hidden}, {args.layers} layers, {n_params} parameters, exported by `kdship.export` "
        "(fp32 ONNX with KV cache), served by `kdship serve --backend onnx` on 127.0.0.1.",
        f"Load: {args.requests} concurrent streaming `/v1/completions` requests, all sent at once (`kdship profile`, concurrency "
        f"{args.requests}), ~{args.prompt_tokens}-word prompts, {args.output_tokens} output tokens each (greedy, ignore_eos). "
        "`max_batch=1` decodes one request at a time (the queue holds the rest); larger values batch continuously.",
        "",
        "| max_batch | answered (200 OK) | errors | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p95 ms | E2E p99 ms | output tok/s | req/s | throughput vs max_batch=1 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, lv in rows:
        gain = f"{lv['output_tokens_per_s'] / base:.2f}x" if base and lv["output_tokens_per_s"] else "-"
        lines.append(
            f"| {b} | {lv['completed']}/{lv['requests']} | {lv['errors']} | {ms(lv['ttft_s']['p50'])} | {ms(lv['ttft_s']['p99'])} | "
            f"{ms(lv['e2e_s']['p50'])} | {ms(lv['e2e_s']['p95'])} | {ms(lv['e2e_s']['p99'])} | {lv['output_tokens_per_s']:.0f} | "
            f"{lv['requests_per_s']:.2f} | {gain} |"
        )
    lines += [
        "",
        "Same requests, the continuous-batching engine alone (in-process, no HTTP, no client): the model-level gain.",
        "",
        "| max_batch | decode steps | wall s | output tok/s | throughput vs max_batch=1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    e_base = engine_rows[0][3] if engine_rows and engine_rows[0][0] == 1 else None
    for b, steps, wall, tps in engine_rows:
        lines.append(f"| {b} | {steps} | {wall:.1f} | {tps:.0f} | {f'{tps / e_base:.2f}x' if e_base else '-'} |")
    all_ok = all(lv["completed"] == lv["requests"] == args.requests for _, lv in rows)
    lines += [
        "",
        f"All {args.requests} requests answered in every configuration: **{'yes' if all_ok else 'NO'}**.",
        "",
        "If the HTTP gain is smaller than the engine-alone gain, the difference is the cost of streaming the SSE "
        "responses from one Python process while the load generator runs on the same cores.",
        "",
        "Latencies are client-side (httpx, same machine: the load generator competes with the server for the same cores). "
        "Full per-target report with plots: `bench/results/serve_profile/report.md`.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.md").write_text("\n".join(lines), encoding="utf-8")
    from run_all import combine_area

    combine_area("serve")
    print("\n".join(lines))


def engine_only(onnx_dir: Path, batches: list[int], n: int, prompt_words: int, output_tokens: int) -> list[tuple]:
    """All ``n`` requests submitted at once to :class:`ContinuousBatchingEngine`; wall time to the last."""
    import threading

    from kdship.runtime.onnx import OnnxCausalLM
    from kdship.profile.run import synthetic_prompt
    from kdship.serve.engine import ContinuousBatchingEngine, GenerationRequest, SamplingParams

    model = OnnxCausalLM(onnx_dir)
    prompts = [model.tokenizer(synthetic_prompt(prompt_words, i)).input_ids for i in range(n)]
    rows = []
    for b in batches:
        engine = ContinuousBatchingEngine(model, max_batch=b, max_queue=n).start()
        left, done, lock = [n], threading.Event(), threading.Lock()

        def emit(ev):
            if ev.kind != "token":
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        t0 = time.perf_counter()
        for p in prompts:
            engine.submit(GenerationRequest(p, SamplingParams(max_tokens=output_tokens, ignore_eos=True), emit))
        done.wait(1800)
        wall = time.perf_counter() - t0
        engine.shutdown()
        rows.append((b, engine.steps, wall, n * output_tokens / wall))
        print(f"engine alone, max_batch {b}: {rows[-1][3]:.0f} tok/s ({engine.steps} decode steps, {wall:.1f} s)", flush=True)
    return rows


if __name__ == "__main__":
    main()
