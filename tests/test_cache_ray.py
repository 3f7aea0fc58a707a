"""`kdship cache --ray`: the shards as Ray tasks on a real local Ray cluster (2 CPUs, 2 workers),
into a local store and into a real S3-compatible server (moto, 127.0.0.1); a task whose worker dies
is retried and resumes. Every store equals a single process's, shard by shard, and holds exactly one
commit record per shard.

The teacher runs with --backend hf: a Ray worker building a vLLM engine on this CPU would take
minutes; the tasks call the same ``cache()`` whatever the backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from kdship.cache.ray_runner import cache_with_ray
from kdship.cache.run import TEST_EXIT_AFTER_COMMIT, CacheError, cache
from kdship.store import COMMITS_DIR, StoreReader
from s3_stores import BUCKET, assert_same_arrays, store_arrays

REPO = Path(__file__).resolve().parents[1]
N_ROWS = 6  # --shard-size 1: 6 shards, 3 per task


@pytest.fixture(scope="module")
def ray_cluster(s3, tmp_path_factory):
    """A local Ray cluster, kept light (2 CPUs, no dashboard, a small object store). Its workers
    import this checkout's kdship and reach the moto server. They all carry the test hook's marker
    path, its file present (the hook disarmed): the retry test arms it by deleting the file, and
    reuses the warm workers instead of starting new ones for another environment."""
    import ray

    marker = tmp_path_factory.mktemp("ray") / "worker-died"
    marker.write_text("disarmed")
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           TEST_EXIT_AFTER_COMMIT: str(marker), **s3["s3_env"]}  # fmt: skip
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=80 << 20, runtime_env={"env_vars": env}, log_to_driver=False)
    yield {"death_marker": marker}
    ray.shutdown()


@pytest.fixture(scope="module")
def rows_and_reference(tmp_path_factory, tiny_teacher, corpus_dir):
    """N_ROWS rows and the arrays of one process's local store of them."""
    d = tmp_path_factory.mktemp("ray_rows")
    rows = (corpus_dir / "text.jsonl").read_text().splitlines()[:N_ROWS]
    data = d / "rows.jsonl"
    data.write_text("".join(line + "\n" for line in rows))
    cache(str(tiny_teacher), str(data), str(d / "ref"), backend="hf", shard_size=1, progress=False)
    ref = store_arrays(d / "ref")
    assert len(ref) == N_ROWS
    return data, ref


def _commit_records(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(f"{path}/{COMMITS_DIR}")
    return fs.ls(f"{path}/{COMMITS_DIR}", detail=False)


def _assert_whole_store(url: str, ref) -> None:
    assert StoreReader(url).header.get("complete") is True
    assert len(_commit_records(url)) == N_ROWS  # one record per shard
    assert_same_arrays(ref, store_arrays(url))


def test_cli_ray_into_a_local_store(ray_cluster, tmp_path, tiny_teacher, rows_and_reference):
    """`kdship cache --ray` (joining the cluster this process already started): 2 tasks, 3 shards each."""
    from typer.testing import CliRunner

    from kdship.cli import app

    data, ref = rows_and_reference
    out = str(tmp_path / "ray.zarr")
    args = ["cache", str(tiny_teacher), str(data), "--out", out, "--backend", "hf", "--shard-size", "1", "--no-progress", "--json", "--ray", "auto", "--ray-workers", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert [(t["shard_index"], t["shards_written"], t["shards_skipped"]) for t in summary["tasks"]] == [(0, 3, 0), (1, 3, 0)]
    assert summary["shards_written"] == N_ROWS and summary["complete"] is True
    _assert_whole_store(out, ref)


def test_ray_into_s3(ray_cluster, tiny_teacher, rows_and_reference):
    data, ref = rows_and_reference
    url = f"s3://{BUCKET}/ray"
    summary = cache_with_ray(str(tiny_teacher), str(data), url, workers=2, backend="hf", shard_size=1)
    assert [t["shards_written"] for t in summary["tasks"]] == [3, 3]
    assert summary["positions"] == sum(int(s.num_positions) for s in ref.values())
    _assert_whole_store(url, ref)


def test_ray_kdship_error_fails_the_run_naming_the_tasks(ray_cluster, tmp_path, tiny_teacher):
    """A kdship error in the tasks (here: no such data file) ends the run with CacheError, not a hang.
    (It runs before the retry test: the workers of the default environment are still warm.)"""
    with pytest.raises(CacheError, match=r"2 of 2 Ray tasks failed(.|\n)*task 0: .*missing.jsonl: data not found"):
        cache_with_ray(str(tiny_teacher), str(tmp_path / "missing.jsonl"), str(tmp_path / "s"), workers=2, retries=2, backend="hf")


def test_ray_task_whose_worker_dies_is_retried_and_resumes(ray_cluster, tiny_teacher, rows_and_reference):
    """The first worker to commit a shard dies right after (os._exit); Ray reruns its task, which
    skips that committed shard and writes its other two: every shard committed once, same arrays."""
    data, ref = rows_and_reference
    marker = ray_cluster["death_marker"]
    marker.unlink()  # arms the hook: the next commit's worker recreates the marker and dies
    url = f"s3://{BUCKET}/retried"
    summary = cache_with_ray(str(tiny_teacher), str(data), url, workers=2, retries=1, backend="hf", shard_size=1)
    assert marker.exists() and marker.read_text() != "disarmed", "no worker died: the test hook did not run"
    died_task = int(marker.read_text()) % 2
    by_task = {t["shard_index"]: (t["shards_written"], t["shards_skipped"]) for t in summary["tasks"]}
    assert by_task == {died_task: (2, 1), 1 - died_task: (3, 0)}
    _assert_whole_store(url, ref)
