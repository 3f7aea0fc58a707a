"""`kdship profile` command line: a thin wrapper over :func:`kdship.profile.run.profile`."""

from __future__ import annotations

from typing import List, Optional

import typer

from kdship.config import signature_defaults, with_default
from kdship.profile.run import profile

DEFAULTS = {"url": [], "target": [], "model": [], "backend": [], **signature_defaults(profile, exclude=("show_progress",))}


def _targets(cfg: dict) -> list[dict]:
    from pathlib import Path

    targets: list[dict] = []
    for i, u in enumerate(cfg["url"] or []):
        targets.append({"name": f"url{i + 1}" if len(cfg["url"]) > 1 else "url", "url": u})
    for spec in cfg["target"] or []:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url:
            raise typer.BadParameter(f"--target expects NAME=URL, got '{spec}'")
        targets.append({"name": name, "url": url})
    models, backends = list(cfg["model"] or []), list(cfg["backend"] or [])
    if models:
        if len(backends) == 1:
            backends = backends * len(models)
        if len(backends) != len(models):
            raise typer.BadParameter(f"--backend: give one for all --model or one per --model ({len(models)}), got {len(backends)}")
        for m, b in zip(models, backends):
            targets.append({"name": f"{Path(m).name}-{b}", "model": m, "backend": b})
    elif backends:
        raise typer.BadParameter("--backend goes with --model")
    return targets


def profile_command(
    url: Optional[List[str]] = typer.Option(None, "--url", help="A running OpenAI-compatible endpoint (loopback only). Repeatable."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="NAME=URL: a named endpoint. Repeatable (e.g. teacher=... student=...)."),
    model: Optional[List[str]] = typer.Option(None, "--model", help="A `kdship export` folder to serve for the run. Repeatable."),
    backend: Optional[List[str]] = typer.Option(None, "--backend", help="onnx or vllm for --model (one for all, or one per --model)."),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help=with_default("Comma-separated concurrency levels.", DEFAULTS, "concurrency")),
    requests: Optional[int] = typer.Option(None, "--requests", help=with_default("Requests per level (at least the concurrency).", DEFAULTS, "requests")),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", help=with_default("Words per synthetic prompt (about that many tokens).", DEFAULTS, "prompt_tokens")),
    output_tokens: Optional[int] = typer.Option(None, "--output-tokens", help=with_default("max_tokens per request.", DEFAULTS, "output_tokens")),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help=with_default("Time cap per level in seconds; no new request after it.", DEFAULTS, "max_seconds")),
    warmup: Optional[int] = typer.Option(None, "--warmup", help=with_default("Unmeasured requests per target first.", DEFAULTS, "warmup")),
    seed: Optional[int] = typer.Option(None, "--seed", help=with_default("Seed of the synthetic prompts.", DEFAULTS, "seed")),
    ignore_eos: Optional[bool] = typer.Option(None, "--ignore-eos/--stop-at-eos", help=with_default("Send ignore_eos so every answer has output-tokens tokens.", DEFAULTS, "ignore_eos")),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer key for the endpoints (and for servers started with --model)."),
    out: Optional[str] = typer.Option(None, "--out", help=with_default("Report folder: report.json, report.md, latency.png, throughput.png.", DEFAULTS, "out")),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file with these options (flags override it)."),
) -> None:
    """Measure TTFT, inter-token and end-to-end latency and throughput of endpoints across concurrency levels."""
    from kdship.config import ConfigError, resolve
    from kdship.profile.run import ProfileError

    flags = dict(
        url=url or None, target=target or None, model=model or None, backend=backend or None, concurrency=concurrency, requests=requests,
        prompt_tokens=prompt_tokens, output_tokens=output_tokens, max_seconds=max_seconds, warmup=warmup, seed=seed,
        ignore_eos=ignore_eos, api_key=api_key, out=out,
    )  # fmt: skip
    try:
        cfg = resolve(DEFAULTS, config, flags)
        conc = cfg["concurrency"]
        if isinstance(conc, str):
            try:
                conc = [int(x) for x in conc.split(",") if x.strip()]
            except ValueError:
                raise typer.BadParameter(f"--concurrency expects comma-separated integers, got '{cfg['concurrency']}'")
        report = profile(
            _targets(cfg), concurrency=conc, requests=int(cfg["requests"]), prompt_tokens=int(cfg["prompt_tokens"]),
            output_tokens=int(cfg["output_tokens"]), out=cfg["out"], max_seconds=float(cfg["max_seconds"]), warmup=int(cfg["warmup"]),
            seed=int(cfg["seed"]), ignore_eos=bool(cfg["ignore_eos"]), api_key=cfg["api_key"],
        )  # fmt: skip
    except (ConfigError, ProfileError) as e:
        typer.echo(f"kdship profile: {e}", err=True)
        raise typer.Exit(2)
    for name, t in report["targets"].items():
        for lv in t["levels"]:
            typer.echo(
                f"{name:>16} c={lv['concurrency']:<4} done {lv['completed']}/{lv['requests']}  e2e p50 {1000 * (lv['e2e_s']['p50'] or 0):.0f} ms "
                f"p99 {1000 * (lv['e2e_s']['p99'] or 0):.0f} ms  TTFT p50 {1000 * (lv['ttft_s']['p50'] or 0):.0f} ms  "
                f"{lv['output_tokens_per_s'] or 0:.1f} tok/s"
            )
    typer.echo(f"report: {cfg['out']}/report.md")
