"""kdship on a lent GPU machine: the CUDA smoke test and `kdship train` throughput, inside a time budget.

Run by bench/gpu.sh (docs/gpu.md) on the device, after the carried wheels are installed; reads what
bench/gpu_prepare.sh wrote here into .gpu/ (the real teacher's config + tokenizer, a store written by
`kdship cache --backend vllm` from the real SmolLM2-135M teacher). Writes OUT/gpu_results.json,
OUT/gpu.md and OUT/gpu_log.txt (every child's output). On a machine without CUDA it runs the same steps
at small sizes (a rehearsal: `bench/gpu_record.py` refuses to record that as a GPU result).

  a. the ceiling: a large bf16 matmul's TFLOP/s on this card (MFU is counted against it)
  b. the loss alone (bench/train_fused_loss.py --device cuda): fused lm_head + loss at several chunk
     budgets, bf16 and fp32 matmul operands, against the unfused loss: time, peak memory, gradients
  c. step profiles: `kdship train --profile-steps` (phases: data wait, host->device, forward, loss,
     backward, optimizer; the loader's decode rate against the step's) for the teacher-shaped student
  d. throughput: `kdship train` from the store with a fresh student of the teacher's architecture
     (`--init-from-config .gpu/teacher --layers L`), store-based KD vs `--online-teacher` with a
     random-init model of the teacher's config (same shape, same FLOPs; the real weights cannot
     travel, so quality is not measured); tokens/s from metrics.jsonl after warm-up, MFU
     (6 x parameters incl. the lm_head x tokens/s / the measured ceiling), peak GPU memory; then the
     same store runs with `--compile`
  e. the cache against plain vLLM (bench/cache_overhead.py) where the device has vLLM (its image has
     none, and the wheel is far over what a call may carry: recorded as skipped)
  f. smoke: pytest on test files that need neither vLLM nor a network; kdship's CUDA paths run
     (`train()` puts the student on cuda under bf16 autocast, --compile and --profile-steps there)
  g. results as JSON + a markdown section (machine named by torch and nvidia-smi)

Every child runs under a timeout cut to what is left of ``--budget-s``; runs that no longer fit are
recorded as skipped, so the whole script ends inside its budget even if a step hangs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / ".gpu"
# Test files that import neither vLLM nor anything from a network (their fixtures build tiny models
# locally; the cache tests use the hf backend), those that run kdship's own CUDA code first (train()
# and the hf backend pick cuda by themselves). The two-process test is left out: torchrun's second
# rank asks for cuda:1, and there is one GPU.
SMOKE_TESTS = ["tests/test_train_profile.py", "tests/test_train.py", "tests/test_train_online.py", "tests/test_losses.py"]
SMOKE_DESELECT = "not two_processes"
CPU_SMOKE_TESTS = ["tests/test_losses.py", "tests/test_store.py"]  # the rehearsal: short
QUALITY_NOTE = ("Quality is not measured: the real teacher's weights (~540 MB) cannot travel to the device. The online "
                "teacher is a random-init model of SmolLM2-135M's config (same shape and vocabulary, so the same work per "
                "token); the store was written here by the real teacher through vLLM.")
RESERVE_S = 15  # kept back for writing the results


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic() - RESERVE_S


def run_child(cmd: list[str], timeout: float, log: Path, title: str) -> dict:
    """Run ``cmd`` (its own process group), output appended to ``log``. At ``timeout`` the group gets
    SIGINT (pytest then still writes its report of the tests run so far), 10 s later SIGKILL."""
    with log.open("a") as fh:
        fh.write(f"\n===== {title}\n$ {' '.join(cmd)}\n")
        fh.flush()
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, process_group=0)
        try:
            rc, timed_out = p.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, signal.SIGINT)
            try:
                rc = p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
            fh.write(f"\n===== {title}: stopped after {timeout:.0f} s\n")
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - t0, 1)}


def machine_info() -> dict:
    import torch
    import transformers
    import zarr

    info = {"python": platform.python_version(), "cpu_cores": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "transformers": transformers.__version__, "zarr": zarr.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_sms=p.multi_processor_count,
                    gpu_capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    return info


def smoke(tests: list[str], timeout: float, work: Path, log: Path) -> dict:
    xml = work / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "120", f"--junitxml={xml}", "-k", SMOKE_DESELECT, *tests]
    res = {"tests": tests, "deselected": SMOKE_DESELECT, **run_child(cmd, timeout, log, "pytest smoke")}
    if xml.is_file():
        suites = ET.parse(xml).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        for k in ("tests", "failures", "errors", "skipped"):
            res[k if k != "tests" else "collected"] = sum(int(s.get(k, 0)) for s in suites)
        res["passed"] = res["collected"] - res["failures"] - res["errors"] - res["skipped"]
        res["failed"] = []
        for case in (c for s in suites for c in s.iter("testcase")):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").strip().splitlines()
                res["failed"].append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:300] if msg else ''}")
    return res


def random_teacher(src: Path, dst: Path, layers: int | None) -> Path:
    """A random-init model of the teacher's config (``layers``: fewer, for the CPU rehearsal), with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = AutoConfig.from_pretrained(src)
    if layers is not None:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(dst, safe_serialization=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    return dst


def steady(run: Path, warm: int) -> dict:
    """Tokens/s and ms/step over the steps after ``warm`` (timings read from the trainer's metrics.jsonl)."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()] if (run / "metrics.jsonl").is_file() else []
    recs = [r for r in recs if "loss" in r]
    if not recs:
        return {"steps_done": 0}
    out = {"steps_done": recs[-1]["step"], "peak_mem_mb": round(max(r["peak_mem_mb"] for r in recs), 1), "loss_last": recs[-1]["loss"]}
    a, b = (recs[warm - 1] if 0 < warm < len(recs) else None), recs[-1]
    if a is not None and b["elapsed_s"] > a["elapsed_s"]:
        dt = b["elapsed_s"] - a["elapsed_s"]
        out.update(tokens_per_s=round((b["tokens"] - a["tokens"]) / dt), ms_per_step=round(1000 * dt / (b["step"] - a["step"]), 2),
                   measured_steps=b["step"] - a["step"])
    return out


def train_run(spec: dict, store: Path, teacher_cfg: Path, online: Path | None, work: Path, log: Path, timeout: float) -> dict:
    run = work / spec["name"]
    cmd = [sys.executable, "-m", "kdship", "train", str(store), "--init-from-config", str(teacher_cfg), "--layers", str(spec["layers"]),
           "--out", str(run), "--max-steps", str(spec["steps"]), "--batch-tokens", str(spec["batch_tokens"]), "--warmup-steps", "2",
           "--eval-every", "0", "--ckpt-every", "0", "--eval-samples", "8", "--log-every", "5", "--no-progress", "--overwrite"]
    if spec["mode"] == "online":
        cmd += ["--online-teacher", str(online)]
    if spec.get("compile"):
        cmd += ["--compile"]
    if spec.get("profile_steps"):
        cmd += ["--profile-steps", str(spec["profile_steps"])]
    res = {**spec, **run_child(cmd, timeout, log, f"train {spec['name']}")}
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        res.update(tokens_per_s_whole_run=round(s["tokens_per_s"]) if s.get("tokens_per_s") else None, train_loop_s=round(s["seconds"], 2),
                   parameters=s.get("parameters"))
    if spec.get("profile_steps") and (run / "profile" / "profile.json").is_file():
        res["profile"] = json.loads((run / "profile" / "profile.json").read_text())
    else:
        res.update(steady(run, spec["warm"]))
    shutil.rmtree(run, ignore_errors=True)  # the final model is hundreds of MB; only the figures are kept
    return res


def matmul_ceiling(cuda: bool) -> dict:
    """The card's dense matmul rate as measured here: bf16 8192^3 on CUDA (median of 10 after warm-up,
    CUDA events), fp32 1024^3 on the CPU rehearsal. MFU is counted against it."""
    import statistics

    import torch

    n, dtype, dev = (8192, torch.bfloat16, "cuda") if cuda else (1024, torch.float32, "cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)  # random data: zeros run faster than real work
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    times = []
    for i in range(13):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            a @ b
            e1.record()
            torch.cuda.synchronize()
            t = e0.elapsed_time(e1) / 1000
        else:
            t0 = time.perf_counter()
            a @ b
            t = time.perf_counter() - t0
        if i >= 3:
            times.append(t)
    t = statistics.median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": float(f"{2 * n**3 / t / 1e12:.4g}")}


def loss_sweep(cuda: bool, work: Path, log: Path, timeout: float) -> dict:
    """bench/train_fused_loss.py --device: the loss alone at the vocabulary and batch of the 16k-token runs."""
    out = work / "loss_sweep.json"
    cmd = [sys.executable, str(ROOT / "bench" / "train_fused_loss.py"), "--device", "cuda" if cuda else "cpu", "--rows", "16384" if cuda else "256",
           "--json", str(out)]
    res = run_child(cmd, timeout, log, "loss sweep")
    if out.is_file():
        res["variants"] = json.loads(out.read_text())
    return res


def cache_vs_vllm(cuda: bool) -> dict:
    """`kdship cache` against plain vLLM on the same prompts, where vLLM can be imported here."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "no vLLM on this machine (the device image has none, and its wheel is far beyond the 64 MiB a call may carry); "
                           "the CPU measurement is bench/results/cache_overhead.md"}
    return {"skipped": "vLLM present: run bench/cache_overhead.py here by hand (the real teacher's weights cannot travel)"}


def plan(cuda: bool, teacher_layers: int, pairs: str | None = None) -> tuple[list[dict], dict]:
    """(train runs in priority order, sizes). First the step profile of the teacher-shaped student at 16k
    tokens, then each (layers, batch) pair: store, then online; then the store runs again with --compile,
    then the small student's profile. ``pairs`` ("LAYERSxBATCH,..."; "T" = the teacher's layers) replaces
    the default pairs, e.g. for a second device call that measures what the first one's budget left out."""
    T = teacher_layers
    if cuda:
        # run_timeout_s: a 30-layer run at 16k tokens took 73 s for 100 steps before the loss was reworked
        sizes = {"pairs": [(6, 16384), (T, 16384), (6, 4096), (T, 4096)], "steps": 40, "warm": 10, "profile": [(T, 16384), (6, 16384)],
                 "compile": [(T, 16384), (6, 16384)], "run_timeout_s": 90, "compile_timeout_s": 180, "smoke_timeout_s": 120, "online_teacher_layers": None}
    else:
        sizes = {"pairs": [(1, 256)], "steps": 4, "warm": 1, "profile": [(1, 256)], "compile": [], "run_timeout_s": 150, "compile_timeout_s": 300,
                 "smoke_timeout_s": 120, "online_teacher_layers": 1}
    if pairs:
        try:
            sizes["pairs"] = [(T if l == "T" else int(l), int(b)) for l, b in (p.split("x") for p in pairs.split(","))]
        except ValueError as e:
            raise SystemExit(f"--pairs {pairs!r}: expected LAYERSxBATCH[,...] (LAYERS a number or T), e.g. Tx16384,6x4096 ({e})") from e
        sizes["profile"] = sizes["compile"] = []
    base = {"steps": sizes["steps"], "warm": sizes["warm"]}
    runs = [{"name": f"L{l}_b{bt}_store_profile", "mode": "store", "layers": l, "batch_tokens": bt, **base, "steps": 7, "profile_steps": 5}
            for l, bt in sizes["profile"][:1]]
    runs += [{"name": f"L{l}_b{bt}_{mode}", "mode": mode, "layers": l, "batch_tokens": bt, **base} for l, bt in sizes["pairs"] for mode in ("store", "online")]
    runs += [{"name": f"L{l}_b{bt}_store_compile", "mode": "store", "layers": l, "batch_tokens": bt, **base, "compile": True} for l, bt in sizes["compile"]]
    runs += [{"name": f"L{l}_b{bt}_store_profile", "mode": "store", "layers": l, "batch_tokens": bt, **base, "steps": 7, "profile_steps": 5}
             for l, bt in sizes["profile"][1:]]
    return runs, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where gpu_results.json, gpu.md and gpu_log.txt go ($OUT on the device)")
    ap.add_argument("--budget-s", type=float, default=440, help="the whole script's wall-clock budget")
    ap.add_argument("--work", default="/tmp/kdship-gpu-work", help="scratch: run directories, the online teacher")
    ap.add_argument("--pairs", help="the (student layers x batch tokens) pairs to time, e.g. Tx16384,Tx4096 (T: the teacher's layers)")
    ap.add_argument("--smoke-tests", help="comma-separated test files instead of the smoke list")
    a = ap.parse_args()
    budget = Budget(a.budget_s)
    t_all = time.monotonic()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = out / "gpu_log.txt"
    store, teacher_cfg = GPU_DIR / "store", GPU_DIR / "teacher"
    if not (store / "zarr.json").is_file() or not (teacher_cfg / "config.json").is_file():
        sys.exit(f"{GPU_DIR}: no store or teacher config; run bench/gpu_prepare.sh on the CPU machine first and carry .gpu")
    machine = machine_info()
    cuda = machine["cuda"]
    teacher_layers = json.loads((teacher_cfg / "config.json").read_text())["num_hidden_layers"]
    runs, sizes = plan(cuda, teacher_layers, a.pairs)
    print(f"mode: {'CUDA' if cuda else 'CPU only (no CUDA device): the rehearsal at small sizes, not a GPU measurement'}", flush=True)
    print("machine:", json.dumps(machine), flush=True)
    res = {"kind": "cuda" if cuda else "cpu-rehearsal", "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
           "kdship_commit": git_head(), "source_sha256": source_sha256(), "budget_s": a.budget_s, "sizes": sizes, "quality_note": QUALITY_NOTE,
           "store": json.loads((GPU_DIR / "prepare.json").read_text()) if (GPU_DIR / "prepare.json").is_file() else None}

    def save() -> None:
        res["wall_s"] = round(time.monotonic() - t_all, 1)
        (out / "gpu_results.json").write_text(json.dumps(res, indent=1))
        (out / "gpu.md").write_text(render_md(res))

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t_all:5.0f} s] {msg}", flush=True)

    res["ceiling"] = matmul_ceiling(cuda)
    say(f"matmul ceiling: {res['ceiling']}")
    if not a.pairs:
        res["loss_sweep"] = loss_sweep(cuda, work, log, min(90, budget.left()))
        say(f"loss sweep: rc={res['loss_sweep']['rc']}, {len(res['loss_sweep'].get('variants', []))} variants")
    save()
    online = random_teacher(teacher_cfg, work / "online_teacher", sizes["online_teacher_layers"])
    res["train"] = []
    for spec in runs:
        limit = sizes["compile_timeout_s"] if spec.get("compile") else sizes["run_timeout_s"]
        if budget.left() < 30:
            res["train"].append({**spec, "skipped": "time budget"})
            continue
        r = train_run(spec, store, teacher_cfg, online, work, log, min(limit, budget.left()))
        res["train"].append(r)
        say(f"train {spec['name']}: rc={r['rc']}{' TIMED OUT' if r['timed_out'] else ''} tokens/s={r.get('tokens_per_s')} ms/step={r.get('ms_per_step')} "
            f"peak={r.get('peak_mem_mb')} MB (process {r['wall_s']} s)")
        save()
    res["cache_vs_vllm"] = cache_vs_vllm(cuda)
    tests = a.smoke_tests.split(",") if a.smoke_tests else SMOKE_TESTS if cuda else CPU_SMOKE_TESTS
    if budget.left() > 30:
        say(f"smoke: pytest {' '.join(tests)}")
        res["smoke"] = smoke(tests, min(sizes["smoke_timeout_s"], budget.left()), work, log)
        say(f"smoke: {_smoke_line(res['smoke'])}")
    else:
        res["smoke"] = {"tests": tests, "skipped": "time budget"}
    save()
    print(render_md(res), flush=True)
    bad = [r["name"] for r in res["train"] if r.get("rc") not in (0, None) or r.get("timed_out")]
    if bad or res["smoke"].get("rc") not in (0, None) or (res.get("loss_sweep") or {}).get("rc") not in (0, None):
        sys.exit(f"NOT ALL GREEN: smoke rc={res['smoke'].get('rc')}, loss sweep rc={(res.get('loss_sweep') or {}).get('rc')}, "
                 f"train runs failed or timed out: {bad or 'none'} (see gpu_log.txt)")


def git_head() -> str | None:
    """The checkout's commit (+ "-dirty" when kdship/ or bench/ has uncommitted changes); None without git
    (the device gets the working tree without .git: bench/gpu_record.py fills it in from source_sha256)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "kdship", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if head and dirty else head or None


def source_sha256() -> str:
    """sha256 of the code that ran: kdship/**/*.py and this script (paths and bytes, sorted)."""
    h = hashlib.sha256()
    for f in sorted([*(ROOT / "kdship").rglob("*.py"), Path(__file__).resolve()]):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _smoke_line(s: dict) -> str:
    if "collected" not in s:
        return f"no report (rc={s['rc']}{', timed out' if s['timed_out'] else ''})"
    return (f"{s['passed']} passed, {s['failures']} failed, {s['errors']} errors, {s['skipped']} skipped of {s['collected']} "
            f"in {s['wall_s']} s{' (TIMED OUT)' if s['timed_out'] else ''}")


def machine_line(m: dict) -> str:
    where = (f"{m['gpu']} ({m['gpu_memory_gib']} GiB, {m['gpu_sms']} SMs, compute capability {m['gpu_capability']}); nvidia-smi: {m.get('nvidia_smi')}"
             if m.get("cuda") else "no CUDA device (CPU rehearsal)")
    return (f"{where}; {m['cpu_cores']} CPU cores; Python {m['python']}, torch {m['torch']} (CUDA {m['torch_cuda']}), "
            f"transformers {m['transformers']}, zarr {m['zarr']}")


def render_runs(runs: list[dict]) -> str:
    """Several device calls' sections (e.g. a second call timing what the first one's budget left out), oldest first."""
    if len(runs) == 1:
        return render_md(runs[0])
    parts = ["# kdship on a GPU: CUDA smoke test and `kdship train` throughput", "",
             f"{len(runs)} device calls, oldest first; each measured its rows side by side in one run.", ""]
    for i, res in enumerate(runs, 1):
        body = render_md(res).split("\n", 2)[2]  # without its own title
        parts += [f"## Device call {i} of {len(runs)} ({res['started_utc']})", "", body.rstrip(), ""]
    return "\n".join(parts)


def mfu(r: dict, ceiling: dict | None) -> float | None:
    """Model FLOPs utilisation: 6 x parameters (the lm_head counted) x tokens/s over the measured ceiling."""
    if not ceiling or not ceiling.get("tflops") or not r.get("parameters") or not r.get("tokens_per_s"):
        return None
    return 6 * r["parameters"] * r["tokens_per_s"] / (ceiling["tflops"] * 1e12)


def render_md(res: dict) -> str:
    """The markdown section (also what bench/gpu_record.py writes to bench/results/gpu.md). Runs recorded
    before the loss sweep, profiles and MFU existed render as they did."""
    cuda = res["kind"] == "cuda"
    st = res.get("store") or {}
    ceiling = res.get("ceiling")
    lines = ["# kdship on a GPU: CUDA smoke test and `kdship train` throughput", ""]
    if not cuda:
        lines += ["**CPU rehearsal, not a GPU measurement** (no CUDA device was found; small sizes).", ""]
    lines += [f"Machine: {machine_line(res['machine'])}. Run {res['started_utc']}, kdship {res.get('kdship_commit') or '(commit unknown)'}, "
              f"by `bash bench/gpu.sh` ({res['wall_s']} s of a {res['budget_s']:.0f} s budget).", ""]
    if ceiling:
        lines += [f"Matmul ceiling measured here: {ceiling['tflops']:,} TFLOP/s ({ceiling['dtype']} {ceiling['n']}^3, median of 10); "
                  "MFU below = 6 x parameters (lm_head included, tied embeddings once) x tokens/s ÷ this.", ""]
    s = res.get("smoke") or {}
    if s.get("skipped"):
        lines += [f"Smoke ({', '.join(f'`{t}`' for t in s.get('tests', []))}): skipped ({s['skipped']})."]
    else:
        lines += [f"Smoke (`pytest -k \"{s.get('deselected')}\"` on {', '.join(f'`{t}`' for t in s.get('tests', []))}): {_smoke_line(s) if s else 'not run'}."]
    for f in s.get("failed", []):
        lines.append(f"- failed: `{f}`")
    lines += [""]
    if st:
        lines += [f"Store: written on the CPU machine by `kdship cache --backend vllm` (default headtail targets) from the real SmolLM2-135M-Instruct "
                  f"on {st['samples']} Shakespeare passages, {st['positions']:,} positions, {st['bytes_per_position']} bytes/position, "
                  f"{st['shards']} shard(s). Student: a fresh model of the teacher's architecture (`--init-from-config`, `--layers L`), "
                  f"bf16 autocast on CUDA.", ""]
    lines += [f"{res['quality_note']}", ""]
    runs = [r for r in res.get("train", []) if not r.get("profile_steps")]
    by = {(r["layers"], r["batch_tokens"], r["mode"]): r for r in runs if not r.get("compile")}
    if ceiling:
        lines += ["| student layers | batch tokens | targets | tokens/s | ms/step | MFU | peak memory (MiB) | steps timed | store ÷ online tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| student layers | batch tokens | targets | tokens/s | ms/step | peak memory (MiB) | steps timed | store ÷ online tokens/s |",
                  "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mode = ("store (headtail)" if r["mode"] == "store" else "online teacher (full logits)") + (", --compile" if r.get("compile") else "")
        if r.get("skipped") or "tokens_per_s" not in r:
            why = f"skipped ({r['skipped']})" if r.get("skipped") else "timed out" if r.get("timed_out") else f"failed (rc={r.get('rc')})"
            lines.append(f"| {r['layers']} | {r['batch_tokens']} | {mode} | {why} | |{' |' if ceiling else ''} | | |")
            continue
        other = by.get((r["layers"], r["batch_tokens"], "online"))
        ratio = f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}" if r["mode"] == "store" and other and other.get("tokens_per_s") else ""
        u = mfu(r, ceiling)
        mfu_cell = (f" {u * 100:.1f} % |" if u is not None else " |") if ceiling else ""
        lines.append(f"| {r['layers']} | {r['batch_tokens']} | {mode} | {r['tokens_per_s']:,} | {r['ms_per_step']} |{mfu_cell} {r['peak_mem_mb']:,.0f} | "
                     f"{r['measured_steps']} of {r['steps_done']}{' (timed out)' if r.get('timed_out') else ''} | {ratio} |")
    lines += ["", f"Tokens/s and ms/step: the trainer's own per-step timings (metrics.jsonl) after the first {(res['sizes'] or {}).get('warm')} steps; "
              "peak memory: `torch.cuda.max_memory_allocated` (on CPU: the process's max RSS). The online runs hold the teacher too.", ""]
    lines += render_profiles(res.get("train", [])) + render_loss_sweep(res.get("loss_sweep"))
    if res.get("cache_vs_vllm"):
        c = res["cache_vs_vllm"]
        lines += [f"Cache vs plain vLLM: {('skipped: ' + c['skipped']) if c.get('skipped') else json.dumps(c)}.", ""]
    return "\n".join(lines)


def render_profiles(runs: list[dict]) -> list[str]:
    """One table of the profiled runs' phases (kdship.train.profile), ms/step and share."""
    from kdship.train.profile import PHASE_TITLES, PHASES

    profs = [r for r in runs if r.get("profile")]
    if not profs:
        return []
    lines = ["Step profiles (`kdship train --profile-steps 5` after 2 warm-up steps, store targets; each phase boundary synchronises the GPU):", "",
             "| phase | " + " | ".join(f"{r['layers']} layers, {r['batch_tokens']} tokens: ms (share)" for r in profs) + " |",
             "|---|" + "---:|" * len(profs)]
    for p in PHASES:
        if all(r["profile"]["phases_ms"][p] < 0.05 for r in profs):
            continue
        lines.append(f"| {PHASE_TITLES[p]} | " + " | ".join(f"{r['profile']['phases_ms'][p]:,.1f} ({r['profile']['phases_ms'][p] / r['profile']['step_ms'] * 100:.0f} %)"
                                                        for r in profs) + " |")
    lines.append("| other (loop, between phases) | " + " | ".join(f"{r['profile']['other_ms']:,.1f}" for r in profs) + " |")
    lines.append("| **step** | " + " | ".join(f"**{r['profile']['step_ms']:,.1f}**" for r in profs) + " |")
    lines.append("| aten operators dispatched per step | " + " | ".join(f"{r['profile'].get('aten_ops_per_step') or 0:,.0f}" for r in profs) + " |")
    lines.append("| loader capacity ÷ the step's consumption | " + " | ".join(
        f"{(r['profile'].get('loader') or {}).get('capacity_over_consumption', float('nan')):,.0f}x" for r in profs) + " |")
    for r in profs:
        ops = r["profile"]["top_ops"][:8]
        lines += ["", f"Top kernels/operators, {r['layers']} layers at {r['batch_tokens']} tokens (self ms/step): "
                  + ", ".join(f"`{o['op'][:60]}` {o['self_ms_per_step']:,.2f}" for o in ops) + "."]
    return lines + [""]


def render_loss_sweep(sweep: dict | None) -> list[str]:
    """bench/train_fused_loss.py --device: the loss alone, per chunk budget and matmul precision."""
    if not sweep or not sweep.get("variants"):
        return [] if not sweep else [f"Loss sweep: no result (rc={sweep.get('rc')}{', timed out' if sweep.get('timed_out') else ''}).", ""]
    v = sweep["variants"]
    ref = v[0]
    lines = [f"The loss alone (`bench/train_fused_loss.py --device`, {ref['rows']:,} rows x vocab 49,152, hidden 576, fkl on headtail rows + 0.5 CE, "
             "value + both gradients; median of 5 after a warm-up; memory above the inputs; differences against the fp32 unfused loss):", "",
             "| variant | ms | ÷ unfused fp32 | peak memory (MiB) | ÷ unfused fp32 | loss rel. diff | grad h rel. diff | grad W rel. diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in v:
        mem = "" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb']:,.0f}"
        mem_ratio = "" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb'] / ref['peak_mb']:.3f}"
        lines.append(f"| {r['variant']} | {r['seconds'] * 1000:,.1f} | {r['seconds'] / ref['seconds']:.2f} | {mem} | {mem_ratio} | "
                     f"{r['loss_rel_diff']:.1e} | {r['grad_h_rel_diff']:.1e} | {r['grad_w_rel_diff']:.1e} |")
    return lines + [""]


if __name__ == "__main__":
    main()
