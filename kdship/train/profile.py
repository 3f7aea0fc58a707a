"""Where a training step's time goes: ``kdship train ... --profile-steps N``.

After ``PROFILE_WARMUP`` steps (lazy initialisation, allocator growth, compilation), N steps run under
``torch.profiler`` with every phase of the step marked::

    data_wait   the main thread waiting for the loader's next batch (the loader is behind)
    h2d         host -> device copies of the batch
    teacher     the online teacher's forward (``--online-teacher`` only: the cost a store removes)
    forward     the student's decoder
    loss        the fused lm_head + loss (its forward also computes the head's gradients, losses.py)
    backward    the decoder's backward
    optimizer   gradient clipping, AdamW, zero_grad, the lr schedule
    log         metrics, progress, the per-step host read of the loss

On CUDA each phase boundary synchronises the device while profiling (so a phase's time is its own work,
not the queue's); outside the profiled steps nothing is synchronised and no phase is timed.

It writes ``RUN_DIR/profile/``: ``profile.md`` (the phase table, the loader's decode rate against what
the step consumes, the top operators), ``profile.json`` (the same figures) and ``trace.json`` (a Chrome
trace: open it in https://ui.perfetto.dev or chrome://tracing).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

PHASES = ("data_wait", "h2d", "teacher", "forward", "loss", "backward", "optimizer", "log")
PHASE_TITLES = {
    "data_wait": "waiting for data (loader behind)",
    "h2d": "host -> device copy",
    "teacher": "online teacher forward (--online-teacher only)",
    "forward": "student forward (decoder)",
    "loss": "lm_head + loss, fused (forward and the head's gradients)",
    "backward": "backward (decoder)",
    "optimizer": "optimizer (clip, AdamW, zero_grad, lr)",
    "log": "logging (metrics, progress, loss read)",
}
PROFILE_WARMUP = 2  # steps before the profiled window
TOP_OPS = 15


class _Off:
    """No profiling: every phase is a no-op context (nothing timed, nothing synchronised)."""

    active = False

    def phase(self, name: str):
        return contextlib.nullcontext()


OFF = _Off()


class StepProfiler:
    """Times the phases of ``steps`` training steps after ``warmup`` steps, under torch.profiler.

    Call ``begin_step(step)`` before each step's data is fetched and ``end_step(tokens)`` after its
    logging; use ``phase(name)`` around each part. ``done`` turns True once the window is written.
    """

    def __init__(self, out_dir: Path, steps: int, device, warmup: int = PROFILE_WARMUP):
        import torch

        if steps < 1:
            raise ValueError(f"--profile-steps must be >= 1, got {steps}")
        self.out_dir, self.steps, self.device, self.warmup = Path(out_dir), int(steps), device, int(warmup)
        self.cuda = device.type == "cuda"
        self.seen = 0  # steps begun
        self.profiled = 0
        self.active = False
        self.done = False
        self.totals = {p: 0.0 for p in PHASES}
        self.step_s = 0.0
        self.tokens = 0
        self._prof = None
        self._t_step = 0.0
        self._torch = torch
        self.ops_per_step: float | None = None

    def _sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _timed(self, name: str):
        from torch.profiler import record_function

        self._sync()
        t0 = time.perf_counter()
        with record_function(f"kdship.{name}"):
            yield
        self._sync()
        self.totals[name] += time.perf_counter() - t0

    def phase(self, name: str):
        return self._timed(name) if self.active else contextlib.nullcontext()

    def begin_step(self) -> None:
        if self.done:
            return
        self.seen += 1
        if self.seen == self.warmup + 1:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=acts, record_shapes=False)
            self._sync()
            self._prof.start()
            self.active = True
        if self.active:
            self._t_step = time.perf_counter()

    def end_step(self, tokens: int, loader=None) -> None:
        if not self.active:
            return
        self._sync()
        self.step_s += time.perf_counter() - self._t_step
        self.tokens += int(tokens)
        self.profiled += 1
        if self.profiled >= self.steps:
            self._finish(loader)

    def close(self, loader=None) -> None:
        """A run that ended inside the window still writes what it profiled."""
        if self.active and self.profiled:
            self._finish(loader)
        elif self.active:
            self._prof.stop()
            self.active = False

    def _finish(self, loader) -> None:
        self._prof.stop()
        self.active, self.done = False, True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        def self_us(e) -> float:
            return e.self_device_time_total if self.cuda else e.self_cpu_time_total

        averages = self._prof.key_averages()
        # operators dispatched per step (nested ones included): on a GPU each is at least one kernel launch,
        # so this count, measured the same on the CPU, says how launch-bound a step would be
        self.ops_per_step = sum(e.count for e in averages if e.key.startswith("aten::")) / self.profiled
        ops = []
        for e in sorted(averages, key=lambda e: -self_us(e)):
            if e.key.startswith("kdship."):
                continue  # our phase markers, already in the phase table
            ops.append({"op": e.key, "calls": int(e.count), "self_ms_per_step": self_us(e) / 1000 / self.profiled})
            if len(ops) >= TOP_OPS:
                break
        report = self.report(loader, ops)
        (self.out_dir / "profile.json").write_text(json.dumps(report, indent=1))
        (self.out_dir / "profile.md").write_text(render_markdown(report))

    def report(self, loader, ops: list[dict]) -> dict[str, Any]:
        n = max(1, self.profiled)
        step_ms = self.step_s / n * 1000
        phases = {p: self.totals[p] / n * 1000 for p in PHASES}
        rec: dict[str, Any] = {
            "device": str(self.device), "steps": self.profiled, "warmup_steps": self.warmup, "tokens_per_step": self.tokens / n,
            "step_ms": step_ms, "tokens_per_s": self.tokens / self.step_s if self.step_s > 0 else None,
            "phases_ms": phases, "other_ms": max(0.0, step_ms - sum(phases.values())), "top_ops": ops,
            "aten_ops_per_step": self.ops_per_step,
            "synchronised": self.cuda,
        }
        stats = loader_stats(loader)
        if stats:
            rec["loader"] = stats
            if rec["tokens_per_s"] and stats.get("capacity_tokens_per_s"):
                rec["loader"]["capacity_over_consumption"] = stats["capacity_tokens_per_s"] / rec["tokens_per_s"]
        return rec


def loader_stats(loader) -> dict[str, Any] | None:
    """The loader's own work per token (decode on its threads, collation on its batch thread), in
    thread CPU seconds: what one core of loader work delivers, whatever the trainer waited."""
    if loader is None:
        return None
    loaders = list(getattr(loader, "loaders", {}).values()) or [loader]
    dec_s = sum(getattr(ld, "decode_cpu_s", 0.0) for ld in loaders)
    dec_pos = sum(getattr(ld, "decoded_positions", 0) for ld in loaders)
    col_s = sum(getattr(ld, "collate_cpu_s", 0.0) for ld in loaders)
    col_tok = sum(getattr(ld, "collated_tokens", 0) for ld in loaders)
    if not dec_pos or not col_tok:
        return None
    per_token = dec_s / dec_pos + col_s / col_tok
    return {
        "decode_positions_per_cpu_s": dec_pos / dec_s if dec_s > 0 else None,
        "collate_tokens_per_cpu_s": col_tok / col_s if col_s > 0 else None,
        "capacity_tokens_per_s": 1.0 / per_token if per_token > 0 else None,
    }


def render_markdown(r: dict[str, Any]) -> str:
    step = r["step_ms"]
    lines = [
        f"# Step profile ({r['device']}, {r['steps']} steps after {r['warmup_steps']} warm-up)",
        "",
        f"{r['tokens_per_step']:,.0f} tokens/step, {step:,.1f} ms/step, {r['tokens_per_s'] or 0:,.0f} tokens/s while profiled"
        + (" (each phase boundary synchronised the GPU)." if r["synchronised"] else ".")
        + (f" {r['aten_ops_per_step']:,.0f} aten operators dispatched per step (nested included; each is a kernel launch or more on a GPU)."
           if r.get("aten_ops_per_step") else ""),
        "",
        "| phase | ms/step | share |",
        "|---|---:|---:|",
    ]
    for p in PHASES:
        ms = r["phases_ms"][p]
        lines.append(f"| {PHASE_TITLES[p]} | {ms:,.1f} | {ms / step * 100 if step else 0:.1f} % |")
    lines.append(f"| other (loop, between phases) | {r['other_ms']:,.1f} | {r['other_ms'] / step * 100 if step else 0:.1f} % |")
    lines.append(f"| **step** | **{step:,.1f}** | 100 % |")
    ld = r.get("loader")
    if ld:
        lines += [
            "",
            f"Loader: decodes {ld['decode_positions_per_cpu_s'] or 0:,.0f} positions per CPU-second, collates {ld['collate_tokens_per_cpu_s'] or 0:,.0f} "
            f"tokens per CPU-second: {ld['capacity_tokens_per_s'] or 0:,.0f} tokens/s from one core, "
            f"**{ld.get('capacity_over_consumption', 0):.1f}x** what the step consumes.",
        ]
    if r["top_ops"]:
        lines += ["", "Top operators by self time (torch.profiler):", "", "| operator | calls/step | self ms/step |", "|---|---:|---:|"]
        n = max(1, r["steps"])
        lines += [f"| `{o['op']}` | {o['calls'] / n:,.0f} | {o['self_ms_per_step']:,.2f} |" for o in r["top_ops"]]
    lines += ["", "trace.json: a Chrome trace of these steps (https://ui.perfetto.dev or chrome://tracing)."]
    return "\n".join(lines) + "\n"
