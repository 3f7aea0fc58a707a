"""``kdship cache --ray ADDRESS``: the shards of one store as W Ray tasks, one teacher engine each.

Task i runs kdship's own ``cache(..., num_shards=W, shard_index=i)`` in a Ray worker process, so the
split, the commits (one immutable record per shard) and resume are exactly those of W hand-launched
``--num-shards W --shard-index i`` writers. A task whose worker dies (node lost, OOM-killed, a crash)
is retried by Ray up to ``retries`` times; the retry resumes its shard index: committed shards are
skipped, so nothing is committed twice.

Retries cover system failures only (``max_retries``; ``retry_exceptions=False``): an exception
raised by kdship (bad input, a settings mismatch, a missing teacher) is deterministic, so a retry
would rebuild an engine only to fail the same way. Transient object-store errors are already retried
inside s3fs/botocore. When every task is done the driver rebuilds ``rejects.jsonl`` (concurrent
writers on an object store have no lock, so only a pass after all of them sees every shard) and
marks the store complete.

Ray is imported lazily: ``pip install "kdship[ray]"``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from kdship.cache.run import CacheError
from kdship.store import StoreReader, StoreWriter, store_exists

log = logging.getLogger("kdship.cache.ray")

RAY_MISSING = 'kdship cache --ray needs Ray: pip install "kdship[ray]"'
# options a Ray task sets itself (its part of the split) or the driver handles once for all tasks
DRIVER_OPTIONS = ("num_shards", "shard_index", "progress", "overwrite", "resume", "teacher_backend")


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise CacheError(RAY_MISSING) from e
    return ray


def connect(address: str):
    """Join (or, for ``local``, start) a Ray cluster; a caller that already called ``ray.init`` keeps its own."""
    ray = import_ray()
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False)
        else:  # "auto" (a cluster started with `ray start` / $RAY_ADDRESS), "ray://head:10001", "head:6379"
            ray.init(address=address)
    return ray


def cluster_gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def plan_workers(n_gpus: int, workers: int | None, gpus_per_worker: float | None, tensor_parallel_size: int = 1) -> tuple[int, float]:
    """(workers, GPUs per worker): by default one worker per ``tensor_parallel_size`` GPUs of the cluster,
    or 2 CPU workers on a cluster without GPUs."""
    if gpus_per_worker is None:
        gpus_per_worker = tensor_parallel_size if n_gpus else 0
    if workers is None:
        workers = max(1, int(n_gpus // gpus_per_worker)) if n_gpus and gpus_per_worker else 2
    if workers < 1:
        raise CacheError(f"--ray-workers {workers}: must be >= 1")
    if gpus_per_worker < 0:
        raise CacheError(f"--ray-gpus-per-worker {gpus_per_worker}: must be >= 0")
    return workers, gpus_per_worker


def _cache_part(teacher: str, data: str, out: str, num_shards: int, shard_index: int, options: dict[str, Any]) -> dict[str, Any]:
    """One Ray task: this worker's part of the split, with its own teacher engine."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this worker process
    from kdship.cache.run import cache

    summary = cache(teacher, data, out, num_shards=num_shards, shard_index=shard_index, progress=False, resume=True, **options)
    summary["shard_index"] = shard_index
    summary["node"] = os.uname().nodename
    return summary


def cache_with_ray(
    teacher: str,
    data: str,
    out: str,
    address: str = "auto",
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    retries: int = 2,
    runtime_env: dict[str, Any] | None = None,
    on_task_done: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``cache()`` over a Ray cluster: W tasks, task i writing shards s with s % W == i into ``out``.

    ``options`` are ``cache()``'s. Returns the usual summary (sums over the tasks) plus ``tasks``, each
    task's own summary; ``on_task_done`` sees each as it finishes. Raises ``CacheError`` naming every
    task that failed (after the others finished: their commits stay, a rerun resumes).
    """
    t_start = time.time()
    _prepare_store(out, options)
    ray = connect(address)
    workers, gpus_per_worker = plan_workers(cluster_gpus(ray), workers, gpus_per_worker, options.get("tensor_parallel_size", 1))
    task = ray.remote(_cache_part).options(num_gpus=gpus_per_worker, max_retries=retries, retry_exceptions=False, runtime_env=runtime_env)
    forwarded = {k: v for k, v in options.items() if k not in DRIVER_OPTIONS}
    pending = {task.remote(teacher, data, out, workers, i, forwarded): i for i in range(workers)}
    log.info("kdship cache --ray: %d tasks, %s GPU(s) each, up to %d retries, into %s", workers, gpus_per_worker, retries, out)
    summaries, failures = [], []
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ref)
        try:
            summaries.append(ray.get(ref))
        except ray.exceptions.RayError as e:  # an application error (RayTaskError) or retries exhausted
            failures.append(f"task {index}: {getattr(e, 'cause', None) or e}")
            continue
        if on_task_done is not None:
            on_task_done(summaries[-1])
    if failures:
        raise CacheError(f"{out}: {len(failures)} of {workers} Ray tasks failed (committed shards stay; rerun to resume):\n" + "\n".join(failures))
    return _combined_summary(out, sorted(summaries, key=lambda s: s["shard_index"]), time.time() - t_start)


def _prepare_store(out: str, options: dict[str, Any]) -> None:
    """What must happen once, before any task: --overwrite deletes the store here (a task doing it
    would delete its peers' commits); --no-resume refuses an existing store."""
    if options.get("teacher_backend") is not None:
        raise CacheError("cache_with_ray builds its teacher in each worker: pass no teacher_backend")
    if options.get("hidden_layers") and "://" in str(out) and not str(out).startswith("file://"):
        raise CacheError(f"{out}: --hidden-layers with --ray needs a local or shared-filesystem store "
                         "(on an object store the projection must be written by --shard-index 0 before the others start)")
    if not store_exists(str(out)):
        return
    if options.get("overwrite"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(out))
        fs.rm(path, recursive=True)
    elif options.get("resume") is False:
        raise CacheError(f"{out}: store exists; pass --resume to continue it or --overwrite to replace it")


SUMMED = ("samples", "positions", "targeted_positions", "generated_tokens", "shards_written", "shards_skipped", "rejects_this_run")


def _combined_summary(out: str, tasks: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The run's summary from its tasks'; the store's rejects file and completeness settled once, here."""
    reader = StoreReader(str(out), verify=False)
    writer = StoreWriter(str(out), reader.header)  # the store's own settings: re-opens it
    n_shards = tasks[0]["shards_total"]
    summary = {k: tasks[0][k] for k in ("store", "mode", "targets", "backend", "top_k", "rows", "shards_total")}
    summary.update({k: sum(t[k] for t in tasks) for k in SUMMED})
    by_reason: dict[str, int] = {}
    for t in tasks:
        for reason, n in t["rejects_by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    summary["rejects_by_reason"] = by_reason
    summary["rejects_in_store"] = writer.rebuild_rejects()
    summary["complete"] = writer.mark_complete(n_shards)
    summary["seconds"] = round(seconds, 2)
    # the cluster's throughput: every task's positions over the driver's wall time (engine starts included)
    summary["positions_per_second"] = round(summary["positions"] / seconds, 1) if seconds else None
    summary["tasks"] = tasks
    return summary
