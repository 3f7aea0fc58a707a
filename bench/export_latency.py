"""ONNX Runtime CPU decode latency vs PyTorch eager, batch 1, for the same trained student.

1. Builds a ~25M-parameter Llama (hidden 512, 8 layers, 8 heads of 64) with the tiny BPE tokenizer and
   trains it with plain cross-entropy on ``kdship.tiny.synthetic_sentences`` for a fixed time budget
   (random weights have near-flat distributions, where int8 flips many near-ties; a trained student
   is what one deploys).
2. Exports it with ``kdship.export.run.export`` (onnx + int8, verified).
3. Times decode steps (64-token prompt, then 64 single-token steps with the KV cache) for PyTorch
   eager, ONNX fp32 and ONNX int8, interleaved in rounds so machine noise hits all three alike;
   reports medians and the ratios ONNX / PyTorch.
4. Memory-bandwidth floor: weight bytes / measured copy bandwidth (numpy copy of a 256 MiB array,
   bandwidth = bytes read + bytes written per second): the least time one decode step can take when
   every weight is read once per token.
5. int8 greedy agreement: teacher-forced top-1 agreement with PyTorch's greedy tokens on 16 prompts x
   32 tokens, plus identical free-running continuations.

Writes bench/results/export.md. Usage: ``.venv/bin/python bench/export_latency.py [--train-seconds 240]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402



def _machine() -> str:
    """Cores, CPU and the load now, measured (bench/run_all.py), never typed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import machine_with_load

    return machine_with_load()

def train_student(out: Path, seconds: float, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdship.tiny import build_tiny_llama, synthetic_sentences

    build_tiny_llama(out, hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376, vocab_size=512, max_positions=512, seed=seed, init_range=0.02)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.train()
    text = synthetic_sentences(20000, seed=11)
    ids = tok(" ".join(text))["input_ids"]
    data = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    seq, bs, steps, t0, losses = 64, 8, 0, time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        starts = torch.randint(0, len(data) - seq - 1, (bs,), generator=g)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        steps += 1
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1), "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])), "params": sum(p.numel() for p in model.parameters())}


def time_torch(model, prompt: list[int], steps: int) -> list[float]:
    out_t = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            nxt = int(out.logits[0, -1].argmax())
            out_t.append(time.perf_counter() - t)
            past = out.past_key_values
    return out_t


def time_onnx(lm, prompt: list[int], steps: int) -> list[float]:
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    logits, past = lm.forward(ids, mask, np.arange(ids.shape[1], dtype=np.int64)[None], lm.new_past(1))
    nxt = int(logits[0, -1].argmax())
    out_t = []
    for _ in range(steps):
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        t = time.perf_counter()
        logits, past = lm.forward(np.asarray([[nxt]], np.int64), mask, np.asarray([[mask.shape[1] - 1]], np.int64), past)
        nxt = int(logits[0, -1].argmax())
        out_t.append(time.perf_counter() - t)
    return out_t


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    a = np.ones(nbytes // 8, np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best  # read + write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-seconds", type=float, default=240)
    ap.add_argument("--student", default=None, help="Use this trained HF student instead of training one here.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16, help="Fixed prompts for the int8 agreement check.")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export.md"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from kdship.runtime.onnx import OnnxCausalLM
    from kdship.export.run import export
    from kdship.export import verify as V

    work = Path(tempfile.mkdtemp(prefix="kdship_bench_export_"))
    if args.student:
        import shutil

        shutil.copytree(args.student, work / "student")
        n = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(work / "student").parameters())
        tr = {"steps": "?", "seconds": "?", "first_loss": float("nan"), "last_loss": float("nan"), "params": n, "given": args.student}
    else:
        print(f"training a student in {work} for {args.train_seconds:.0f} s ...", flush=True)
        tr = train_student(work / "student", args.train_seconds)
    print(tr, flush=True)
    t = time.perf_counter()
    rep = export(work / "student", work / "export", formats="onnx", quantize="int8", verify=True, prompts=args.prompts, new_tokens=args.new_tokens, vllm=False)
    export_s = time.perf_counter() - t
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32).eval()
    threads = int(os.environ["OMP_NUM_THREADS"])
    fp32 = OnnxCausalLM(work / "export" / "onnx", num_threads=threads)
    int8 = OnnxCausalLM(work / "export" / "onnx", int8=True, num_threads=threads)
    from kdship.tiny import synthetic_sentences

    prompt = fp32.tokenizer(" ".join(synthetic_sentences(20, seed=99)))["input_ids"][:64]
    # warm-up
    time_torch(model, prompt, 4), time_onnx(fp32, prompt, 4), time_onnx(int8, prompt, 4)
    per = {"pytorch": [], "onnx_fp32": [], "onnx_int8": []}
    for r in range(args.rounds):
        per["pytorch"].append(statistics.median(time_torch(model, prompt, args.steps)))
        per["onnx_fp32"].append(statistics.median(time_onnx(fp32, prompt, args.steps)))
        per["onnx_int8"].append(statistics.median(time_onnx(int8, prompt, args.steps)))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.2f} ms" for k, v in per.items()), flush=True)
    med = {k: statistics.median(v) for k, v in per.items()}
    bw = copy_bandwidth()
    w_fp32 = sum(p.numel() * 4 for p in model.parameters())
    w_int8 = rep["int8"]["int8_bytes"]
    floor = {"pytorch": w_fp32 / bw, "onnx_fp32": w_fp32 / bw, "onnx_int8": w_int8 / bw}
    v = rep["verify"]
    lines = [
        "# Export: ONNX Runtime CPU decode latency vs PyTorch eager",
        "",
        f"Machine: {_machine()} "
        f"(the three backends are timed interleaved in {args.rounds} rounds of {args.steps} decode steps, medians).",
        f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, threads {os.environ['OMP_NUM_THREADS']}.",
        "",
        (f"Student: {tr['given']} ({tr['params'] / 1e6:.1f}M parameters). " if "given" in tr else
         f"Student: Llama, {tr['params'] / 1e6:.1f}M parameters (hidden 512, 8 layers, 8 heads x 64, vocab 512), "
         f"trained with plain cross-entropy on synthetic sentences for {tr['seconds']} s ({tr['steps']} steps of 8 x 64 tokens, AdamW lr 3e-3, "
         f"loss {tr['first_loss']:.2f} -> {tr['last_loss']:.2f}). ")
        + "Batch 1, 64-token prompt, then one token per step with the KV cache.",
        f"Export + verification took {export_s:.0f} s; fp32 ONNX max |logit diff| vs PyTorch "
        f"{v['onnx']['max_abs_logit_diff']:.2e}, greedy identical {v['onnx']['greedy_identical']}/{v['onnx']['greedy_prompts']}.",
        "",
        "| backend | decode ms/token | ÷ PyTorch eager | weight bytes | bandwidth floor ms | ÷ floor | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    goals = {"pytorch": "-", "onnx_fp32": "<= 0.40", "onnx_int8": "<= 0.25"}
    for k in ("pytorch", "onnx_fp32", "onnx_int8"):
        wb = w_int8 if k == "onnx_int8" else w_fp32
        lines.append(f"| {k} | {med[k] * 1e3:.2f} | {med[k] / med['pytorch']:.2f} | {wb / 1e6:.1f} MB | {floor[k] * 1e3:.2f} | {med[k] / floor[k]:.1f}x | {goals[k]} |")
    i8 = v["onnx_int8"]
    lines += [
        "",
        f"Copy bandwidth (numpy, 256 MiB, read + write): {bw / 1e9:.1f} GB/s.",
        "",
        f"int8 drift ({args.prompts} fixed prompts x {args.new_tokens} greedy tokens): teacher-forced top-1 agreement with PyTorch "
        f"**{i8['top1_agreement']:.1%}** (goal >= 95 %), identical free-running continuations "
        f"{i8['greedy_identical']}/{i8['greedy_prompts']}, max |logit diff| {i8['max_abs_logit_diff']:.3f}.",
        "",
        "Per-round medians (ms): " + "; ".join(f"{k}: " + ", ".join(f"{x * 1e3:.2f}" for x in vals) for k, vals in per.items()),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    del V


if __name__ == "__main__":
    main()
