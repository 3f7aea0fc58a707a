"""`kdship profile`: an HTTP load generator for OpenAI-compatible endpoints (kdship serve, vLLM, ...).

For each target and each concurrency level C, C client workers (asyncio + httpx) send ``requests``
streaming ``/v1/completions`` requests (distinct synthetic prompts of about ``prompt_tokens`` words,
``max_tokens = output_tokens``, ``ignore_eos`` so every answer has the same length, greedy). Measured
per request, on the client's clock:

- TTFT: request sent -> first streamed chunk carrying text;
- inter-token latency (ITL): gaps between successive text chunks, pooled over requests
  (a chunk carrying k tokens counts as one gap: servers that coalesce tokens show fewer, longer gaps);
- TPOT: (end-to-end - TTFT) / (output tokens - 1), per request;
- end-to-end latency: sent -> ``[DONE]``;
- per level: output tokens/s = sum of completion tokens / level wall time; requests/s likewise.

Bounded: ``requests`` per level, ``max_seconds`` per level (no new request after it), and only
loopback URLs (this is a load generator: it must not be aimed at someone else's server).
Writes ``report.json``, ``report.md``, ``latency.png`` and ``throughput.png`` into ``out``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import platform
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import numpy as np

_WORDS = (
    "the a one two three red green blue small large quick slow cat dog bird fish tree river hill city road house "
    "runs jumps sees eats finds makes takes gives near over under with from into and but or because when then so "
    "very not all some many few good bad old new happy sad what where who how why is are was were will can may must"
).split()


class ProfileError(ValueError):
    """A target or option that cannot be profiled; the message names which."""


@dataclass
class Target:
    """One endpoint to measure: a running server (``url``) or a model folder to serve for the run
    (``model`` + ``backend``, started with :func:`kdship.runtime.server_process.launch` and stopped after)."""

    name: str
    url: str | None = None
    model: str | None = None
    backend: str | None = None
    api_key: str | None = None
    serve_options: dict = field(default_factory=dict)


def parse_target(spec: Any, index: int = 0) -> Target:
    """``Target`` | dict | ``"NAME=URL"`` | ``"URL"`` -> :class:`Target`."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, dict):
        known = {"name", "url", "model", "backend", "api_key", "serve_options"}
        bad = set(spec) - known
        if bad:
            raise ProfileError(f"target {index}: unknown key(s) {sorted(bad)}; known: {sorted(known)}")
        t = Target(**{"name": spec.get("name") or f"target{index + 1}", **{k: v for k, v in spec.items() if k != "name"}})
    elif isinstance(spec, str):
        name, sep, rest = spec.partition("=")
        if sep and not name.startswith("http"):
            t = Target(name=name, url=rest)
        else:
            t = Target(name=urlparse(spec).netloc or f"target{index + 1}", url=spec)
    else:
        raise ProfileError(f"target {index}: expected NAME=URL, a URL or a mapping, got {type(spec).__name__}")
    if (t.url is None) == (t.model is None):
        raise ProfileError(f"target '{t.name}': give exactly one of url or model")
    if t.model is not None and t.backend not in ("onnx", "vllm"):
        raise ProfileError(f"target '{t.name}': backend must be onnx or vllm for a model folder, got {t.backend!r}")
    return t


def check_loopback(url: str) -> None:
    """Refuse anything but a loopback address (every address the host name resolves to)."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ProfileError(f"{url}: expected an http(s)://HOST:PORT URL")
    try:
        infos = socket.getaddrinfo(u.hostname, u.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ProfileError(f"{url}: cannot resolve {u.hostname}: {e}") from e
    addrs = {i[4][0] for i in infos}
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ProfileError(f"{url}: {u.hostname} is not a loopback address ({', '.join(sorted(addrs))}); kdship profile only loads local endpoints")


def synthetic_prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n_words)))


def percentiles(xs: Iterable[float]) -> dict:
    a = np.asarray(list(xs), dtype=np.float64)
    if a.size == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "n": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(a.mean()), "n": int(a.size)}


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    gaps: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


async def _one_request(client, url: str, body: dict) -> RequestResult:
    t0 = time.perf_counter()
    ttft = None
    last = None
    gaps: list[float] = []
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                return RequestResult(False, error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    return RequestResult(False, error=f"stream error: {msg['error']}")
                if msg.get("usage"):
                    usage = msg["usage"]
                for ch in msg.get("choices") or []:
                    text = ch.get("text")
                    if text is None:
                        text = (ch.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - t0
                        else:
                            gaps.append(now - last)
                        last = now
                        chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is a measurement, not a crash
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - t0
    out_tokens = int(usage["completion_tokens"]) if usage else chunks
    prompt_tokens = int(usage["prompt_tokens"]) if usage else 0
    return RequestResult(True, ttft=ttft, e2e=e2e, gaps=gaps, prompt_tokens=prompt_tokens, output_tokens=out_tokens)


async def _run_level(url: str, headers: dict, model: str, concurrency: int, n_requests: int, prompt_tokens: int, output_tokens: int, max_seconds: float, seed: int, ignore_eos: bool, progress=None, task=None) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(max(60.0, max_seconds * 2), connect=10.0)
    results: list[RequestResult] = []
    counter = iter(range(n_requests))
    deadline = time.perf_counter() + max_seconds
    truncated = False

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:

        async def worker():
            nonlocal truncated
            for i in counter:
                if time.perf_counter() > deadline:
                    truncated = True
                    return
                body = {
                    "model": model,
                    "prompt": synthetic_prompt(prompt_tokens, seed * 1_000_003 + concurrency * 10_007 + i),
                    "max_tokens": output_tokens,
                    "temperature": 0.0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                if ignore_eos:
                    body["ignore_eos"] = True
                results.append(await _one_request(client, url + "/v1/completions", body))
                if progress is not None:
                    progress.advance(task)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0

    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    total_out = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "first_errors": errors[:3],
        "truncated_by_time": truncated,
        "duration_s": wall,
        "ttft_s": percentiles(r.ttft for r in ok if r.ttft is not None),
        "itl_s": percentiles(g for r in ok for g in r.gaps),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles(r.e2e for r in ok),
        "output_tokens_per_s": total_out / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])) if ok else None,
        "mean_output_tokens": float(np.mean([r.output_tokens for r in ok])) if ok else None,
    }


def _model_id(url: str, headers: dict) -> str:
    import httpx

    r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    if r.status_code != 200:
        raise ProfileError(f"{url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    data = r.json().get("data") or []
    if not data:
        raise ProfileError(f"{url}/v1/models lists no model")
    return data[0]["id"]


def profile(
    targets: list,
    concurrency: Iterable[int] = (1, 4, 16, 64),
    requests: int = 64,
    prompt_tokens: int = 32,
    output_tokens: int = 32,
    out: str | Path = "profile_report",
    max_seconds: float = 120.0,
    warmup: int = 2,
    seed: int = 0,
    ignore_eos: bool = True,
    api_key: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Load-test each target at each concurrency level; write the report files; return the report.

    ``targets``: ``"NAME=URL"`` strings, :class:`Target` objects or dicts (``{"name", "url"}`` or
    ``{"name", "model", "backend"}``: that folder is served for the run on a free loopback port).
    ``requests``: requests per level (at least ``concurrency``, so every worker sends one).
    ``prompt_tokens`` / ``output_tokens``: words per synthetic prompt / ``max_tokens`` per answer.
    ``max_seconds``: per level; no request starts after it (the level is marked truncated).
    """
    levels = sorted({int(c) for c in concurrency})
    if not levels or levels[0] < 1:
        raise ProfileError(f"--concurrency: levels must be integers >= 1, got {list(concurrency)}")
    if levels[-1] > 1024:
        raise ProfileError(f"--concurrency: {levels[-1]} is above the 1024 bound")
    if requests < 1 or requests > 100_000:
        raise ProfileError(f"--requests must be in 1..100000, got {requests}")
    if prompt_tokens < 1 or output_tokens < 1:
        raise ProfileError("--prompt-tokens and --output-tokens must be >= 1")
    if not targets:
        raise ProfileError("no targets: give --url/--target NAME=URL or --model DIR --backend B")
    parsed = [parse_target(t, i) for i, t in enumerate(targets)]
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ProfileError(f"target names must be distinct, got {names}")
    for t in parsed:
        if t.url:
            check_loopback(t.url)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    report: dict[str, Any] = {
        "config": {
            "concurrency": levels, "requests_per_level": requests, "prompt_words": prompt_tokens, "output_tokens": output_tokens,
            "max_seconds_per_level": max_seconds, "warmup": warmup, "seed": seed, "ignore_eos": ignore_eos, "temperature": 0.0,
        },
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": _cpu_count()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "targets": {},
    }  # fmt: skip
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not show_progress) as progress:
        for t in parsed:
            handle = None
            try:
                key = t.api_key or api_key
                if t.model is not None:
                    from kdship.runtime.server_process import launch

                    progress.console.print(f"[{t.name}] starting {t.backend} server for {t.model} ...")
                    handle = launch(t.model, backend=t.backend, api_key=key, **t.serve_options)
                    url = handle.url
                else:
                    url = t.url.rstrip("/")
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                model = _model_id(url, headers)
                if warmup:
                    asyncio.run(_run_level(url, headers, model, 1, warmup, prompt_tokens, output_tokens, max_seconds, seed + 99, ignore_eos))
                entry = {"url": url, "model": model, "source": t.model or t.url, "backend": t.backend, "levels": []}
                for c in levels:
                    n = max(requests, c)
                    task = progress.add_task(f"{t.name} c={c}", total=n)
                    lvl = asyncio.run(_run_level(url, headers, model, c, n, prompt_tokens, output_tokens, max_seconds, seed, ignore_eos, progress, task))
                    entry["levels"].append(lvl)
                    if lvl["errors"]:
                        progress.console.print(f"[{t.name}] c={c}: {lvl['errors']} failed request(s), e.g. {lvl['first_errors'][0]}")
                report["targets"][t.name] = entry
            finally:
                if handle is not None:
                    handle.stop()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    plots = write_plots(report, out)
    (out / "report.md").write_text(render_markdown(report, plots), encoding="utf-8")
    report["files"] = [str(out / "report.json"), str(out / "report.md"), *[str(out / p) for p in plots]]
    return report


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.2f}"


def render_markdown(report: dict, plots: list[str]) -> str:
    cfg = report["config"]
    lines = [
        "# kdship profile report",
        "",
        f"Started {report['started']}, machine: {report['machine']['platform']} ({report['machine']['cpus']} CPUs).",
        f"Per level: {cfg['requests_per_level']} streaming /v1/completions requests (at least one per worker), "
        f"~{cfg['prompt_words']}-word prompts, max_tokens {cfg['output_tokens']}, greedy, ignore_eos={cfg['ignore_eos']}, "
        f"at most {cfg['max_seconds_per_level']:.0f} s per level. Latencies in ms, client-side.",
        "",
    ]
    for name, t in report["targets"].items():
        lines += [f"## {name}", "", f"`{t['source']}` at {t['url']} (model `{t['model']}`{', backend ' + t['backend'] if t.get('backend') else ''})", ""]
        lines += [
            "| concurrency | done/sent | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p95 | E2E p99 | out tok/s | req/s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lv in t["levels"]:
            flag = " (time cap)" if lv["truncated_by_time"] else ""
            lines.append(
                f"| {lv['concurrency']} | {lv['completed']}/{lv['requests']}{flag} | {_ms(lv['ttft_s']['p50'])} | {_ms(lv['ttft_s']['p99'])} | "
                f"{_ms(lv['itl_s']['p50'])} | {_ms(lv['itl_s']['p99'])} | {_ms(lv['e2e_s']['p50'])} | {_ms(lv['e2e_s']['p95'])} | "
                f"{_ms(lv['e2e_s']['p99'])} | {lv['output_tokens_per_s'] or 0:.1f} | {lv['requests_per_s'] or 0:.2f} |"
            )
        errs = [e for lv in t["levels"] for e in lv["first_errors"]]
        if errs:
            lines += ["", f"Errors (first): `{errs[0]}`"]
        lines.append("")
    if len(report["targets"]) > 1:
        lines += ["## Comparison (output tokens/s at each concurrency)", ""]
        names = list(report["targets"])
        lines += ["| concurrency | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for i, c in enumerate(report["config"]["concurrency"]):
            cells = []
            for n in names:
                lv = report["targets"][n]["levels"]
                cells.append(f"{lv[i]['output_tokens_per_s']:.1f}" if i < len(lv) and lv[i]["output_tokens_per_s"] else "-")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


def _style_concurrency_axes(axes, titles, units) -> None:
    """Shared look of every profile plot: concurrency on a log2 x axis, one title and unit each."""
    for ax, title, unit in zip(axes, titles, units):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)


def write_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, t in report["targets"].items():
        cs = [lv["concurrency"] for lv in t["levels"]]

        def series(key, q):
            return [np.nan if lv[key][q] is None else 1000 * lv[key][q] for lv in t["levels"]]

        axes[0].plot(cs, series("e2e_s", "p50"), "o-", label=f"{name} p50")
        axes[0].plot(cs, series("e2e_s", "p99"), "s--", label=f"{name} p99")
        axes[1].plot(cs, series("ttft_s", "p50"), "o-", label=f"{name} p50")
        axes[1].plot(cs, series("ttft_s", "p99"), "s--", label=f"{name} p99")
        axes[2].plot(cs, series("itl_s", "p50"), "o-", label=f"{name} p50")
        axes[2].plot(cs, series("itl_s", "p99"), "s--", label=f"{name} p99")
    _style_concurrency_axes(axes, ("end-to-end latency", "time to first token", "inter-token latency"), ("ms",) * 3)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, t in report["targets"].items():
        cs = [lv["concurrency"] for lv in t["levels"]]
        axes[0].plot(cs, [lv["output_tokens_per_s"] or np.nan for lv in t["levels"]], "o-", label=name)
        axes[1].plot(cs, [lv["requests_per_s"] or np.nan for lv in t["levels"]], "o-", label=name)
    _style_concurrency_axes(axes, ("output throughput", "request throughput"), ("tokens/s", "requests/s"))
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    return ["latency.png", "throughput.png"]
