"""The fused lm_head + loss against the unfused one: peak memory and time at vocab 49,152, 16,384 rows.

Run: .venv/bin/python bench/train_fused_loss.py [--rows 16384] [--baseline REF]
Writes bench/results/train_fused_loss.md (merged into bench/results/train.md).

One loss, kdship's default: forward KL on headtail rows (4 exact entries, the data token, 8 draws) + 0.5 CE,
value and gradients w.r.t. the hidden states [N, 576] and the lm_head [49152, 576], float32 on the CPU.
  * unfused : logits = h W^T [N, V] through autograd, log_softmax, gather, the same row losses
              (kdship.train.losses.kd_row_losses) and backward: the [N, V] logits and their gradient live
  * fused   : kdship.train.losses.DistillLoss (chunked lm_head, the head's gradient inside the forward),
              at the CPU's chunk budget and at CUDA's (LOGIT_BUDGET), and from REF (the code before a change)
Each variant runs alone in its own process; memory = the process's peak RSS (VmHWM) minus its RSS just
before the loss; time = the best of 2 repetitions. Values and gradients are compared with the unfused ones.

On a GPU (bench/gpu_bench.py runs it): ``--device cuda --json FILE`` measures every variant in this one
process instead -- the unfused loss as an autocast trainer computes it (bf16 logits, upcast for the loss),
and the fused one with bf16 matmul operands at several chunk budgets (the knob the CUDA default was
chosen by) and with fp32 operands; time = median of 5 after a warm-up (CUDA events), memory =
torch.cuda.max_memory_allocated above what the inputs hold. The CPU rehearsal runs it with ``--device cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".kdship" / "bench" / "train_fused_loss"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
H, V, K = 576, 49152, 13


def vm_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def case(n: int):
    import torch
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, H, generator=g) * 0.5
    w = torch.randn(V, H, generator=g) * 0.02
    ids = torch.randint(0, V, (n, K), generator=g)
    lp = torch.log_softmax(torch.randn(n, K, generator=g) * 2, -1) - 0.05
    weights = lp.exp() * 0.97  # exact entries w = p; the 3 % left is a "beyond" bucket
    rows = SimpleNamespace(topk_ids=ids, topk_logprobs=lp, target_weights=weights, targets=torch.randint(0, V, (n,), generator=g),
                           row_weight=torch.full((n,), 1.0 / n), target_drawn=None)
    return h, w, rows


def child(variant: str, n: int, module_path: str | None) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if module_path:  # the losses module of another commit
        import importlib.util

        spec = importlib.util.spec_from_file_location("losses_ref", module_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["losses_ref"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    else:
        from kdship.train import losses as mod
    h0, w0, rows = case(n)
    cfg = mod.LossConfig(kind="fkl", ce_weight=0.5)
    if variant == "fused_cuda_budget":
        cfg.chunk_rows = mod.LOGIT_BUDGET["cuda"] // V

    def once():
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        if variant == "unfused":
            z = h @ w.T
            lq = torch.log_softmax(z, -1)
            s_kd = lq.gather(1, rows.topk_ids)
            valid = torch.isfinite(rows.topk_logprobs)
            kd = mod.kd_row_losses(cfg, s_kd, rows.topk_logprobs, valid, rows.target_weights, V)
            ce = -lq.gather(1, rows.targets[:, None]).squeeze(1)
            loss = (rows.row_weight * (0.5 * kd + 0.5 * ce)).sum()
        else:
            loss, _ = mod.DistillLoss(cfg, V)(h, w, rows)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    best, out = float("inf"), None
    base_kb = peak_kb = 0
    for _ in range(2):
        import gc

        out = None
        gc.collect()
        base_kb = vm_kb("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        out = once()
        best = min(best, time.perf_counter() - t0)
        peak_kb = max(peak_kb, vm_kb("VmHWM") - base_kb)
    loss, gh, gw = out
    torch.save({"loss": loss, "gh": gh, "gw": gw}, WORK / f"grads_{variant}.pt")
    return {"variant": variant, "rows": n, "seconds": best, "peak_mb": peak_kb / 1024, "loss": float(loss)}


# logits per chunk measured on a device (the fused loss's chunk budget; LOGIT_BUDGET["cuda"] is the default)
DEVICE_BUDGETS = (1 << 23, 1 << 25, 1 << 26, 1 << 27, 1 << 28)


def device_sweep(device: str, n: int) -> list[dict]:
    """Every variant in this process on ``device`` (the GPU mode, module docstring); fp32 unfused is the reference."""
    import statistics

    import torch

    from kdship.train import losses as mod

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    h0, w0, rows = case(n)
    h0, w0 = h0.to(dev), w0.to(dev)
    rows.__dict__.update({k: v.to(dev) for k, v in vars(rows).items() if torch.is_tensor(v)})

    def unfused(h, w, bf16):
        z = (h.bfloat16() @ w.bfloat16().T).float() if bf16 else h @ w.T
        lq = torch.log_softmax(z, -1)
        cfg = mod.LossConfig(kind="fkl", ce_weight=0.5)
        kd = mod.kd_row_losses(cfg, lq.gather(1, rows.topk_ids), rows.topk_logprobs, torch.isfinite(rows.topk_logprobs), rows.target_weights, V)
        ce = -lq.gather(1, rows.targets[:, None]).squeeze(1)
        return (rows.row_weight * (0.5 * kd + 0.5 * ce)).sum()

    def fused(budget, mm_dtype):
        def f(h, w):
            cfg = mod.LossConfig(kind="fkl", ce_weight=0.5, chunk_rows=max(16, budget // V))
            return mod.DistillLoss(cfg, V).parts_tensor(h, w, rows, matmul_dtype=mm_dtype)[0]
        return f

    variants = [("unfused_fp32", lambda h, w: unfused(h, w, False)), ("unfused_bf16_logits", lambda h, w: unfused(h, w, True))]
    variants += [(f"fused_bf16_{b >> 20}M", fused(b, torch.bfloat16)) for b in DEVICE_BUDGETS]
    variants += [(f"fused_fp32_{mod.LOGIT_BUDGET['cuda'] >> 20}M", fused(mod.LOGIT_BUDGET["cuda"], None))]

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    out, ref = [], None
    for name, fn in variants:
        times, res = [], None
        for rep in range(6 if cuda else 2):
            h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            t0 = time.perf_counter()
            loss = fn(h, w)
            loss.backward()
            sync()
            times.append(time.perf_counter() - t0)
            peak_mb = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if cuda else float("nan")
            res = (loss.detach().double(), h.grad.double(), w.grad.double())
        if ref is None:
            ref = res
        t = statistics.median(times[1:]) if len(times) > 2 else min(times)
        out.append({"variant": name, "rows": n, "seconds": t, "peak_mb": peak_mb,
                    "loss_rel_diff": abs(float(res[0] - ref[0])) / abs(float(ref[0])),
                    "grad_h_rel_diff": float((res[1] - ref[1]).norm() / ref[1].norm()),
                    "grad_w_rel_diff": float((res[2] - ref[2]).norm() / ref[2].norm())})
        print(json.dumps(out[-1]), flush=True)
        del res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--device", default=None, help="cuda (or cpu for a rehearsal): every variant in this process, results to --json only")
    ap.add_argument("--json", default=None, help="with --device: write the variants' figures here")
    ap.add_argument("--baseline", default=None, help="git ref whose kdship/train/losses.py is measured too (the fused loss before a change)")
    ap.add_argument("--_child", default=None)
    ap.add_argument("--_module", default=None)
    a = ap.parse_args()
    if a.device:
        rows = device_sweep(a.device, a.rows)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    if a._child:
        print("RESULT " + json.dumps(child(a._child, a.rows, a._module)), flush=True)
        return
    from run_all import combine_area, machine_with_load, merge

    machine = machine_with_load()
    variants = [("unfused", None), ("fused", None), ("fused_cuda_budget", None)]
    ref_label = None
    if a.baseline:
        ref_label = subprocess.run(["git", "rev-parse", "--short", a.baseline], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        src = subprocess.run(["git", "show", f"{a.baseline}:kdship/train/losses.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        mod_path = WORK / f"losses_{ref_label}.py"
        mod_path.write_text(src)
        variants.insert(1, (f"fused_{ref_label}", str(mod_path)))
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 2)), "PYTHONPATH": str(ROOT)}
    for name, mod in variants:
        variant = "fused" if name.startswith("fused_") and mod else name
        cmd = [sys.executable, __file__, "--_child", variant, "--rows", str(a.rows)] + (["--_module", mod] if mod else [])
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
        r = {**json.loads(line[0][7:]), "variant": name}
        if mod:
            os.replace(WORK / "grads_fused.pt", WORK / f"grads_{name}.pt")
        rows.append(r)
        print(r, flush=True)
    import torch

    ref = torch.load(WORK / "grads_unfused.pt", weights_only=True)
    for r in rows:
        g = torch.load(WORK / f"grads_{r['variant']}.pt", weights_only=True)
        r["loss_rel_diff"] = abs(float(g["loss"]) - float(ref["loss"])) / abs(float(ref["loss"]))
        r["grad_h_rel_diff"] = float((g["gh"] - ref["gh"]).norm() / ref["gh"].norm())
        r["grad_w_rel_diff"] = float((g["gw"] - ref["gw"]).norm() / ref["gw"].norm())
    write_results(rows, a, machine, ref_label)
    combine_area("train")
    merge()


def write_results(rows: list[dict], a, machine: str, ref_label: str | None) -> None:
    un = next(r for r in rows if r["variant"] == "unfused")
    titles = {"unfused": "unfused: full [N, V] logits through autograd", "fused": "kdship fused, the CPU's chunk budget (8M logits)",
              "fused_cuda_budget": "kdship fused, CUDA's chunk budget (64M logits)"}
    if ref_label:
        titles[f"fused_{ref_label}"] = f"kdship fused before ({ref_label}), the CPU's chunk budget"
    lines = [
        "# The fused lm_head + loss vs the unfused one",
        "",
        f"Machine: {machine}. By `bench/train_fused_loss.py`: vocab {V:,}, hidden {H}, {a.rows:,} rows, fkl on headtail rows + 0.5 CE, "
        "value and both gradients, float32; each variant alone in its own process (peak RSS growth), time = best of 2.",
        "",
        "| variant | peak memory (MB) | ÷ unfused | seconds | ÷ unfused | loss rel. diff | grad h rel. diff | grad W rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {titles[r['variant']]} | {r['peak_mb']:,.0f} | **{r['peak_mb'] / un['peak_mb']:.3f}** | {r['seconds']:.2f} | {r['seconds'] / un['seconds']:.2f} | "
                     f"{r['loss_rel_diff']:.1e} | {r['grad_h_rel_diff']:.1e} | {r['grad_w_rel_diff']:.1e} |")
    lines += ["", "Goal (issue 27): the fused loss's peak memory ≤ 0.25× the unfused one at this size; it must match the dense reference "
              "(float64 value and gradient: tests/test_losses.py)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_fused_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
