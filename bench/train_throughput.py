"""Trainer throughput and memory vs plain CE fine-tuning and vs online KD; loader decode rate.

Run: .venv/bin/python bench/train_throughput.py [--steps 30] [--quick]
Writes bench/results/train_throughput.md (merged into bench/results/train.md by the same run).

Every mode runs in its own subprocess (clean peak-memory numbers) on the same packed batches from
the same store, the same student, AdamW, same batch size:
  * kdship      : the trainer's step (decoder -> fused chunked lm_head + stored top-k loss)
  * plain_ce    : transformers forward to full logits + F.cross_entropy on the same tokens
  * online_kd   : the teacher (>= 8x the student's parameters) run every step + full-logit KL
Memory is the process's peak RSS during the steps minus its RSS just before them (CPU), or
torch.cuda.max_memory_allocated (CUDA). Two student vocabularies: the tokenizer's 512, and a table
padded to 32768 rows (the lm_head then dominates, as in real students; ids beyond the tokenizer are
never targets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".kdship" / "bench" / "train_throughput"
RESULTS = ROOT / "bench" / "results"



def _machine() -> str:
    """Cores, CPU and the load now, measured (bench/run_all.py), never typed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import machine_with_load

    return machine_with_load()

def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prepare(quick: bool) -> dict:
    from kdship.cache.run import cache
    from kdship.tiny import build_tiny_llama, synthetic_sentences, write_jsonl

    WORK.mkdir(parents=True, exist_ok=True)
    teacher = WORK / "teacher"
    if not (teacher / "config.json").is_file():
        build_tiny_llama(teacher, hidden=512, layers=8, heads=8, kv_heads=8, seed=0, init_range=0.05)
    student = WORK / "student"
    if not (student / "config.json").is_file():
        build_tiny_llama(student, hidden=256, layers=2, heads=4, kv_heads=4, seed=1, init_range=0.02, tokenizer_dir=teacher)
    padded = WORK / "student_v32k"
    if not (padded / "config.json").is_file():
        import shutil

        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(student)
        m.resize_token_embeddings(32768)
        m.save_pretrained(padded)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(student / f, padded / f)
    store = WORK / "store_k32"
    if not (store / "zarr.json").is_file():
        n = 300 if quick else 600
        sents = synthetic_sentences(n * 4, seed=5)
        data = write_jsonl(WORK / "text.jsonl", [{"text": " ".join(sents[i : i + 4])} for i in range(0, n * 4, 4)])
        cache(str(teacher), str(data), str(store), top_k=32, backend="hf", shard_size=100, progress=False, overwrite=True)
    return {"teacher": str(teacher), "student": str(student), "student_v32k": str(padded), "store": str(store)}


def params(d: str) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters())


# ---------------------------------------------------------------------------------------------------
# One mode, in a subprocess


def make_stepper(mode: str, paths: dict, student_key: str, batches):
    """A closure running one optimizer step of ``mode`` on a batch; each mode owns its student copy."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from kdship.train.losses import DistillLoss, LossConfig
    from kdship.train.trainer import _make_wrapper

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ac = torch.bfloat16 if dev.type == "cuda" else None
    student = AutoModelForCausalLM.from_pretrained(paths[student_key], dtype=torch.float32).to(dev).train()
    teacher = None
    if mode == "online_kd":
        teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32).to(dev).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, foreach=True)
    wrapper = _make_wrapper(student, DistillLoss(LossConfig(kind="fkl", tail="bucket"), 512), ac)

    def step(b):
        ids, pos, pred = b.input_ids.to(dev), b.position_ids.to(dev), b.pred_index.to(dev)
        if mode == "kdship":
            loss, _ = wrapper(ids, pos, pred, b.rows.to(dev))
        else:
            ctx = torch.autocast(dev.type, dtype=ac) if ac else torch.autocast("cpu", enabled=False)
            with ctx:
                logits = student(input_ids=ids, position_ids=pos, use_cache=False).logits
            logits = logits.reshape(-1, logits.shape[-1])[pred].float()
            if mode == "plain_ce":
                loss = F.cross_entropy(logits, b.rows.targets.to(dev))
            else:
                with torch.no_grad(), ctx:
                    t_logits = teacher(input_ids=ids, position_ids=pos, use_cache=False).logits
                t_lp = torch.log_softmax(t_logits.reshape(-1, t_logits.shape[-1])[pred].float(), -1)
                s_lp = torch.log_softmax(logits, -1)[:, : t_lp.shape[-1]]
                loss = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step, dev


def load_batches(paths: dict, n: int, batch_tokens: int):
    from kdship.train.loader import StoreLoader

    loader = StoreLoader(paths["store"], batch_tokens, seed=0, heldout_fraction=0.0, workers=2)
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) >= n:
            break
    loader.close()
    return batches


def run_memory(mode: str, paths: dict, student_key: str, steps: int, warmup: int, batch_tokens: int) -> dict:
    """Peak working-set growth of ``steps`` training steps (own process: clean numbers)."""
    import torch

    batches = load_batches(paths, steps + warmup, batch_tokens)
    step, dev = make_stepper(mode, paths, student_key, batches)
    for b in batches[:warmup]:
        step(b)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    import ctypes
    import gc
    import threading

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base_rss = rss_mb()
    peak = [base_rss]
    stop = threading.Event()

    def poll():  # RSS sampled every millisecond: the peak happens inside a step
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    for b in batches[warmup:]:
        step(b)
    stop.set()
    t.join()
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        mem = peak[0] - base_rss
    return {"mode": mode, "student": student_key, "mem_mb": mem, "device": str(dev)}


def run_speed(paths: dict, student_key: str, rounds: int, steps: int, batch_tokens: int) -> list[dict]:
    """All three modes in one process, interleaved round by round on the same batches; a mode's
    speed is its best round (the machine is shared: the best round is the least disturbed one)."""
    import time

    batches = load_batches(paths, steps, batch_tokens)
    modes = ("kdship", "plain_ce", "online_kd")
    steppers = {m: make_stepper(m, paths, student_key, batches)[0] for m in modes}
    for m in modes:  # warm-up
        steppers[m](batches[0])
    tokens = sum(b.tokens for b in batches)
    best = {m: float("inf") for m in modes}
    for _ in range(rounds):
        for m in modes:
            t0 = time.perf_counter()
            for b in batches:
                steppers[m](b)
            best[m] = min(best[m], time.perf_counter() - t0)
    return [{"mode": m, "student": student_key, "tokens": tokens, "seconds": best[m], "tokens_per_s": tokens / best[m]} for m in modes]


# ---------------------------------------------------------------------------------------------------
# Loader decode rate


def decode_rate(store: str, work: Path, copies: int, layouts: tuple[tuple[int, int], ...] = ((4096, 1), (65536, 1), (65536, 8))) -> list[dict]:
    """Per shard size: positions per CPU-second for (a) decoding shards (zarr decode + checksum) on one
    thread, (b) the same without the checksum, (c) the loader pipeline (decode + shuffle + pack +
    collate) with one decode worker. The stores hold the same positions (copies of the bench store's
    samples, same content statistics), grouped into shards the way `kdship cache --shard-positions P`
    groups rows; ``join`` consecutive samples are concatenated into one (longer samples: less
    per-sample work in packing)."""
    import numpy as np

    import shutil

    from kdship.cache.run import plan_shards
    from kdship.store import Shard, StoreReader, StoreWriter
    from kdship.train.loader import StoreLoader

    src = StoreReader(store)
    samples = []
    for c in range(copies):
        for _, sh in src.iter_shards():
            for i in range(sh.num_samples):
                s = sh.sample(i)
                s["sample_index"] = len(samples)
                # shift tokens so hashes differ (held-out selection / joins stay per sample)
                s["tokens"] = s["tokens"].copy()
                s["tokens"][0] = (int(s["tokens"][0]) + c) % 512
                samples.append(s)
    out = []
    for P, join in layouts:
        joined = samples if join == 1 else [
            {**{k: np.concatenate([x[k] for x in samples[i : i + join]]) for k in ("tokens", "loss_mask", "topk_ids", "topk_logprobs")}, "sample_index": i // join}
            for i in range(0, len(samples), join)
        ]
        path = work / f"store_p{P}_j{join}"
        marker = path / f"built_{len(samples)}"
        if not marker.is_file():
            shutil.rmtree(path, ignore_errors=True)
            starts = plan_shards(len(joined), {i: len(s["tokens"]) for i, s in enumerate(joined)}, P)
            w = StoreWriter(str(path), {**src.header, "shard_size": None, "shard_positions": P}, overwrite=True)
            for si, (a, b) in enumerate(zip(starts, starts[1:] + [len(joined)])):
                w.write_shard(si, Shard.build(joined[a:b], src.top_k))
            w.update_header(complete=True)
            marker.write_text("")
        reader = StoreReader(str(path), verify=True)
        reader.read_shard(reader.shard_paths[0])  # first-call costs (imports, codec setup) out of the timing
        t0, c0 = time.perf_counter(), time.process_time()
        pos = sum(reader.read_shard(p).num_positions for p in reader.shard_paths)
        t_dec, c_dec = time.perf_counter() - t0, time.process_time() - c0
        reader_nv = StoreReader(str(path), verify=False)
        c0 = time.process_time()
        for p in reader_nv.shard_paths:
            reader_nv.read_shard(p)
        c_nv = time.process_time() - c0
        ld = StoreLoader(str(path), batch_tokens=4096, seed=0, heldout_fraction=0.0, workers=1, max_epochs=1)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in ld:
            pass
        t_ld, c_ld = time.perf_counter() - t0, time.process_time() - c0
        ld.close()
        out.append({
            "shard_positions": P, "shards": len(reader.shard_paths), "positions": pos, "k": reader.top_k, "mean_sample": pos / len(joined),
            "decode_pos_per_s": pos / t_dec, "decode_pos_per_cpu_s": pos / c_dec, "decode_noverify_pos_per_cpu_s": pos / c_nv,
            "loader_pos_per_cpu_s": pos / c_ld, "loader_pos_per_s": pos / t_ld,
            "bytes_per_position": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / pos,
        })
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="batches per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reuse-speed", action="store_true", help="reuse the speed rounds saved by an earlier run (re-measure memory, decode)")
    ap.add_argument("--decode-only", action="store_true", help="re-measure only the loader decode rate; reuse the last run's throughput rows")
    ap.add_argument("--_mode", default=None)
    ap.add_argument("--_student", default=None)
    a = ap.parse_args()
    if a._mode:  # child
        paths = json.loads((WORK / "paths.json").read_text())
        print("RESULT " + json.dumps(run_memory(a._mode, paths, a._student, a.steps, a.warmup, a.batch_tokens)))
        return
    paths = prepare(a.quick)
    (WORK / "paths.json").write_text(json.dumps(paths))
    saved = WORK / "throughput.json"
    if a.decode_only and saved.is_file():
        t = json.loads(saved.read_text())
        write_results(t["rows"], t["n_t"], t["n_s"], t["train_tps"], decode_rate(paths["store"], WORK, copies=4 if a.quick else 12), argparse.Namespace(**t["args"]))
        return
    n_t, n_s = params(paths["teacher"]), params(paths["student"])
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for student_key in ("student", "student_v32k"):
        speed_file = WORK / f"speed_{student_key}.json"
        if a.reuse_speed and speed_file.is_file():
            speed = json.loads(speed_file.read_text())
        else:
            speed = {r["mode"]: r for r in run_speed(paths, student_key, a.rounds, a.steps, a.batch_tokens)}
            speed_file.write_text(json.dumps(speed))
        for mode in ("kdship", "plain_ce", "online_kd"):
            cmd = [sys.executable, __file__, "--_mode", mode, "--_student", student_key, "--steps", str(min(a.steps, 8)), "--warmup", "2", "--batch-tokens", str(a.batch_tokens)]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=1800)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"{mode}/{student_key} failed:\n{p.stderr[-3000:]}")
            r = {**speed[mode], **json.loads(line[0][7:])}
            rows.append(r)
            print(r, flush=True)
    # the full train() loop (loader thread, metrics, progress) on the same store, for comparison
    from kdship.train.trainer import train

    train(paths["store"], student=paths["student"], out=str(WORK / "run"), max_steps=a.steps + a.warmup, batch_tokens=a.batch_tokens,
              eval_every=0, ckpt_every=0, heldout_fraction=0.0, progress=False, overwrite=True)
    recs = [json.loads(x) for x in (WORK / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    w = recs[a.warmup - 1]
    train_tps = (recs[-1]["tokens"] - w["tokens"]) / (recs[-1]["elapsed_s"] - w["elapsed_s"])
    saved.write_text(json.dumps({"rows": rows, "n_t": n_t, "n_s": n_s, "train_tps": train_tps, "args": vars(a)}))
    dec = decode_rate(paths["store"], WORK, copies=4 if a.quick else 12)
    write_results(rows, n_t, n_s, train_tps, dec, a)


def write_results(rows, n_t, n_s, train_tps, dec, a) -> None:
    by = {(r["student"], r["mode"]): r for r in rows}
    dev = rows[0]["device"]
    machine = _machine() if dev == "cpu" else f"{platform.machine()} CUDA, {os.cpu_count()} cores"
    lines = [
        "# kdship train: throughput and memory",
        "",
        f"Machine: {machine}. torch threads per process: {os.environ.get('OMP_NUM_THREADS', '2')}.",
        f"Student {n_s/1e6:.2f} M parameters (vocab 512), teacher {n_t/1e6:.2f} M ({n_t/n_s:.1f}x); store k=32 (hf backend),",
        f"Speed: the same {a.steps} packed batches of {a.batch_tokens} tokens per mode, modes interleaved in one process for {a.rounds} rounds,",
        "best round per mode (the machine is shared). Memory: each mode alone in its own process, 8 steps after 2 warm-up.",
        "",
        "| student vocab | mode | tokens/s | memory (MB) | tokens/s ÷ plain CE | memory ÷ plain CE | ÷ online KD |",
        "|---|---|---|---|---|---|---|",
    ]
    for sk, vname in (("student", "512"), ("student_v32k", "32768 (padded)")):
        ce, on = by[(sk, "plain_ce")], by[(sk, "online_kd")]
        for m in ("kdship", "plain_ce", "online_kd"):
            r = by[(sk, m)]
            lines.append(f"| {vname} | {m} | {r['tokens_per_s']:.0f} | {r['mem_mb']:.1f} | {r['tokens_per_s']/ce['tokens_per_s']:.2f} | "
                         f"{(r['mem_mb']/ce['mem_mb']) if ce['mem_mb'] > 0 else float('nan'):.2f} | {r['tokens_per_s']/on['tokens_per_s']:.2f} |")
    k = by[("student", "kdship")]
    lines += [
        "",
        f"Full `train()` loop (loader thread, metrics, same store/student/batch), run separately afterwards: {train_tps:.0f} tokens/s "
        f"(not comparable with the table: the machine's load changed between the two; the step alone measured {k['tokens_per_s']:.0f}).",
        "",
        "Goals: trainer ÷ plain CE tokens/s >= 0.90; memory ÷ plain CE <= 1.10; trainer ÷ online KD (teacher >= 8x) >= 3.",
        "",
        "## Loader decode rate",
        "",
        f"The same {dec[0]['positions']:,} positions at k={dec[0]['k']} (copies of the bench store's samples), grouped into shards the way",
        "`kdship cache --shard-positions P` groups rows; one decode thread. Per core = positions ÷ the process's CPU seconds.",
        "The last row joins 8 consecutive samples into one: packing and collation cost per sample, not per position.",
        "",
        "| positions per shard (P) | positions per sample | shards | bytes/position | decode + sha256 verify (M pos/CPU-s) | decode only | loader pipeline: decode + verify + shuffle + pack + collate | wall clock, decode + verify |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {d['shard_positions']:,} | {d['mean_sample']:.0f} | {d['shards']} | {d['bytes_per_position']:.1f} | **{d['decode_pos_per_cpu_s']/1e6:.2f}** | {d['decode_noverify_pos_per_cpu_s']/1e6:.2f} | "
          f"{d['loader_pos_per_cpu_s']/1e6:.2f} | {d['decode_pos_per_s']/1e6:.2f} M/s |" for d in dec],
        "",
        "zarr-python costs ~12 ms of CPU per shard whatever its size (one event-loop round trip, metadata and index read per array, 7 arrays),",
        "so small shards are overhead-bound; `kdship cache` therefore plans shards by positions (default 65,536). Chunks along T are",
        "32,768 positions (4,096 in kdship 0.1: per-chunk overhead again). A reader verifies a shard's sha256 the first time it",
        "reads it; later epochs run at the decode-only rate. Under DDP every rank decodes every shard (each builds the same",
        "global batch), so the rate needed per rank is the global tokens/s; `--workers` threads decode in parallel.",
        "",
        "Goal: >= 1 M positions/s per core.",
        "",
        "Memory on the CPU is resident-set growth during the timed steps (activations, gradients, optimizer state, logits),",
        "an approximation: the allocator may keep freed pages. CE and online KD hold full [tokens, vocab] float32 logits;",
        "kdship never holds more than one chunk of them.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.md").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import combine_area

    combine_area("train")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
