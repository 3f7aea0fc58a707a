"""`kdship cache` and `kdship inspect`: thin typer wrappers over ``kdship.cache.run.cache`` and
``kdship.cache.inspect.inspect_store``. Heavy imports (torch, vLLM) happen inside the commands."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer

from kdship.cache.run import DEFAULTS, TOP_K_DEFAULT
from kdship.config import with_default


def cache_command(
    teacher: str = typer.Argument(..., help="Teacher: a local Hugging Face model directory (or a hub id where a hub is reachable)."),
    data: str = typer.Argument(..., help="Input: JSONL ({prompt,response} | {text} | {messages}), Parquet, or a `datasets` save_to_disk folder."),
    out: str = typer.Option(None, "--out", "-o", help="Store: a folder or an fsspec URL (default cache/<data name>.zarr)."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of options; flags given here override it."),
    mode: Optional[str] = typer.Option(None, help="score (teacher-forced top-k over prompt+response) | generate (teacher samples responses)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="headtail: the exact head h; topk: k; sampled: the draws N. Default " + ", ".join(f"{k} {v}" for k, v in TOP_K_DEFAULT.items()) + "."),
    targets: Optional[str] = typer.Option(None, help="headtail (default: exact top-h head + data token + exact rest mass + --draws draws from the residual; unbiased) | topk | sampled (v1 random-sampling KD)."),
    draws: Optional[int] = typer.Option(None, "--draws", help="headtail: tokens drawn per position from the teacher's residual distribution (systematic sampling, at most 255). Default 16 (8 with --draw-logprobs)."),
    certain_exact: Optional[bool] = typer.Option(None, "--certain-exact/--no-certain-exact", help=with_default("headtail: a residual token the draws would hit whatever the random offset (n * r >= 1) is stored exact instead of as a draw (one draw fewer), removing the count's rounding noise; unbiased either way.", DEFAULTS, "certain_exact")),
    draw_logprobs: Optional[bool] = typer.Option(None, "--draw-logprobs/--no-draw-logprobs", help="headtail: store the draws' teacher logprobs (default: not stored). Without them (ids and counts only; ~1.7 B per draw less with SmolLM2) the store trains fkl and CE, kdship train's default loss, whose gradient needs none: the bytes buy 16 stratified draws instead of 8. --draw-logprobs writes the store every divergence trains from (rkl, jsd, skl, srkl, tvd, --draw-estimator cv; 8 plain draws by default)."),
    draw_power: Optional[float] = typer.Option(None, "--draw-power", help=with_default("headtail, experimental: draw from the residual raised to this power (< 1: flatter, more draws in the far tail), weighted by count * p^(1 - power) normalised to the row's rest mass (self-normalised).", DEFAULTS, "draw_power")),
    far_oversample: Optional[int] = typer.Option(None, "--far-oversample", help="headtail: stratified draws: --far-draws f of the N draws go to the residual's last share phi = f / (f + k (N - f)) of its mass, k times as densely as the rest (encoded in the counts: unbiased, readers unchanged). 1 = off. Default 3 without the draws' logprobs, off with --draw-logprobs, --certain-exact or --draw-power."),
    far_draws: Optional[int] = typer.Option(None, "--far-draws", help="With --far-oversample: the draws of the far stratum (default a quarter of --draws)."),
    sampled_candidates: Optional[int] = typer.Option(None, "--sampled-candidates", help=with_default("vLLM only, headtail / sampled: draw from the top-K' candidates (the mass beyond them is stored as one bucket for headtail); --backend hf draws exactly.", DEFAULTS, "sampled_candidates")),
    backend: Optional[str] = typer.Option(None, help=with_default("vllm | hf (plain transformers, the reference) | openai (--teacher-url).", DEFAULTS, "backend")),
    teacher_url: Optional[str] = typer.Option(None, "--teacher-url", help="OpenAI-compatible endpoint for --backend openai (TEACHER then only needs its tokenizer)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KDSHIP_TEACHER_API_KEY", help="API key for --teacher-url (or $KDSHIP_TEACHER_API_KEY)."),
    samples: Optional[int] = typer.Option(None, help=with_default("generate: responses per prompt.", DEFAULTS, "samples")),
    temperature: Optional[float] = typer.Option(None, help=with_default("generate: sampling temperature; targets stay raw logprobs.", DEFAULTS, "temperature")),
    top_p: Optional[float] = typer.Option(None, "--top-p", help=with_default("generate: nucleus sampling.", DEFAULTS, "top_p")),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help=with_default("generate: tokens per response.", DEFAULTS, "max_new_tokens")),
    seed: Optional[int] = typer.Option(None, help=with_default("Seed; each (row, sample) gets its own derived seed.", DEFAULTS, "seed")),
    max_length: Optional[int] = typer.Option(None, "--max-length", help=with_default("Max tokens per sample (capped at the teacher's context).", DEFAULTS, "max_length")),
    overflow: Optional[str] = typer.Option(None, help=with_default("Rows over --max-length: error | truncate | skip (to rejects).", DEFAULTS, "overflow")),
    shard_positions: Optional[int] = typer.Option(None, "--shard-positions", help=with_default("Close a shard once its rows reach this many positions.", DEFAULTS, "shard_positions")),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Samples per shard instead of --shard-positions (small shards commit often but read slowly)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help=with_default("Continue an existing store after its last committed shard.", DEFAULTS, "resume")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Delete an existing store first."),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad", help="Write bad rows to STORE/rejects.jsonl instead of stopping."),
    num_shards: Optional[int] = typer.Option(None, "--num-shards", help=with_default("Split the work over N processes/hosts.", DEFAULTS, "num_shards")),
    shard_index: Optional[int] = typer.Option(None, "--shard-index", help="This process's part, 0..N-1."),
    tensor_parallel_size: Optional[int] = typer.Option(None, "--tensor-parallel-size", help="vLLM tensor parallelism for large teachers."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=with_default("The teacher's compute dtype (vllm, hf): auto (float32 on the CPU; on CUDA the model's own dtype with vllm, bfloat16 with hf), float32, bfloat16, float16.", DEFAULTS, "dtype")),
    filter: Optional[str] = typer.Option(None, "--filter", help="generate: answer-match (keep generations whose final answer matches the row's)."),
    min_new_tokens: Optional[int] = typer.Option(None, "--min-new-tokens", help="generate: reject responses shorter than this."),
    max_response_tokens: Optional[int] = typer.Option(None, "--max-response-tokens", help="generate: reject responses longer than this."),
    dedupe: Optional[bool] = typer.Option(None, "--dedupe", help="generate: reject exact duplicate responses of a prompt."),
    require_finished: Optional[bool] = typer.Option(None, "--require-finished", help="generate: reject responses cut off at --max-new-tokens."),
    split: Optional[str] = typer.Option(None, help="Split of a DatasetDict folder (default train)."),
    hidden_layers: Optional[str] = typer.Option(None, "--hidden-layers", help="Hint KD, --backend hf only: also store the teacher's hidden states at these layers, e.g. 4,8 (transformers' output_hidden_states index: 0 = embeddings, i = after block i), projected by PCA to --hidden-dim."),
    hidden_dim: Optional[int] = typer.Option(None, "--hidden-dim", help="With --hidden-layers: dimensions kept per layer (PCA fitted on the first rows, stored in the store; at most the teacher's hidden size)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="Run the shards as Ray tasks, one teacher engine per worker, into one store: local (start Ray on this machine), auto (the cluster of `ray start` / $RAY_ADDRESS), or ray://HEAD:10001."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="With --ray: tasks (each does shards s with s % W == i). Default: the cluster's GPUs / --ray-gpus-per-worker, or 2 without GPUs."),
    ray_gpus_per_worker: Optional[float] = typer.Option(None, "--ray-gpus-per-worker", help="With --ray: GPUs per task. Default --tensor-parallel-size on a GPU cluster, else 0."),
    ray_retries: int = typer.Option(2, "--ray-retries", help="With --ray: reruns of a task whose worker died (it resumes its shards); kdship's own errors are not retried."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run the teacher once over DATA and write its next-token distributions (sparse targets) to a Zarr store."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: seconds, not a minute
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for the summary (--json)
    from kdship.cache.run import CacheError, cache
    from kdship.config import ConfigError, resolve

    flags = dict(
        mode=mode, top_k=top_k, targets=targets, draws=draws, certain_exact=certain_exact, draw_logprobs=draw_logprobs, draw_power=draw_power, far_oversample=far_oversample, far_draws=far_draws, sampled_candidates=sampled_candidates, backend=backend, teacher_url=teacher_url, api_key=api_key,
        samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, max_length=max_length,
        overflow=overflow, shard_size=shard_size, shard_positions=shard_positions, resume=resume, overwrite=overwrite, skip_bad=skip_bad, num_shards=num_shards,
        shard_index=shard_index, tensor_parallel_size=tensor_parallel_size, dtype=dtype, filter=filter, min_new_tokens=min_new_tokens,
        max_response_tokens=max_response_tokens, dedupe=dedupe, require_finished=require_finished, split=split,
        hidden_layers=hidden_layers, hidden_dim=hidden_dim,
    )
    try:
        cfg = resolve(dict(DEFAULTS), config, flags)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if no_progress:
        cfg["progress"] = False
    if out is None:
        out = os.path.join("cache", os.path.basename(data.rstrip("/")).split(".")[0] + ".zarr")
    try:
        if ray is None:
            summary = cache(teacher, data, out, **cfg)
        else:
            summary = _cache_on_ray(teacher, data, out, cfg, ray, ray_workers, ray_gpus_per_worker, ray_retries)
    except (CacheError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    typer.echo(
        f"{summary['store']}: {summary['samples']} samples, {summary['positions']} positions "
        f"({summary['targeted_positions']} targeted), k={summary['top_k']}, "
        f"{summary['shards_written']} shards written, {summary['shards_skipped']} already committed, "
        f"{summary['rejects_this_run']} rejects {summary['rejects_by_reason'] or ''}, "
        + (f"residual mass beyond the candidates {summary['missing_mass']:.4f}/row, " if summary.get("missing_mass") is not None else "")
        + f"{summary['positions_per_second']} positions/s, complete={summary['complete']}"
    )


def _cache_on_ray(teacher, data, out, cfg, address, workers, gpus_per_worker, retries):
    from kdship.cache.ray_runner import cache_with_ray
    from kdship.cache.run import CacheError

    if cfg["num_shards"] != 1 or cfg["shard_index"] != 0:
        raise CacheError("--ray splits the shards itself: drop --num-shards/--shard-index (or use --ray-workers)")

    def report(t):
        typer.echo(f"task {t['shard_index']} on {t['node']}: {t['samples']} samples, {t['positions']} positions, {t['shards_written']} shards written, "
                   f"{t['shards_skipped']} already committed, {t['positions_per_second']} positions/s", err=True)

    return cache_with_ray(teacher, data, out, address=address, workers=workers, gpus_per_worker=gpus_per_worker, retries=retries, on_task_done=report, **cfg)


def inspect_command(
    store: str = typer.Argument(..., help="A kdship store (folder or fsspec URL)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every shard's checksum."),
) -> None:
    """Summarise a store: samples, positions, k, bytes per position, top-k mass, teacher, completeness, rejects."""
    from kdship.cache.inspect import format_report, inspect_store
    from kdship.store import StoreError

    try:
        info = inspect_store(store, verify=verify)
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(info, indent=1) if as_json else format_report(info))
