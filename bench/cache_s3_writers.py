"""Many writers on an S3 store, most of them SIGKILLed: is any shard lost or committed twice?

A real S3-compatible server (moto's server mode, from PyPI) on 127.0.0.1 and s3fs, as in the tests
(tests/s3_stores.py starts it). Two runs of `kdship cache` into s3://, each checked against one
process's local store of the same rows, shard by shard:

  * processes: W writers (`kdship cache --num-shards W --shard-index i`, one process each) start at
    once; K of them are SIGKILLed at random points (seeded: after a random number of their own
    commits plus a random delay, so some die mid-shard); the K are rerun.
  * --ray: `kdship cache --ray` on a local Ray cluster on this machine, W tasks; K of the W task
    processes (``ray::_cache_part``) are SIGKILLed at random points; Ray retries them (the retry
    resumes its shard index). No rerun by hand.

Counted: shards expected, shards in the store, commit records, samples lost (an expected sample index
missing), samples duplicated (an index twice), shards whose arrays differ from the reference.
The teacher is a tiny random Llama with ``--backend hf``: the question is the commit protocol, not the
teacher, and W vLLM engines on 2 cores would take minutes each to start.

    .venv/bin/python bench/cache_s3_writers.py [--rows 32] [--writers 4] [--kill 3] [--seed 0]

Writes bench/results/cache_s3_writers.md (merged into bench/results/cache.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from s3_stores import COMPARED_ARRAYS, cache_cmd  # noqa: E402  (the tests' own command line and comparison)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

def _records(fs, url: str) -> list[str]:
    from kdship.store import COMMITS_DIR

    path = f"{url.removeprefix('s3://')}/{COMMITS_DIR}"
    fs.invalidate_cache(path)
    return fs.ls(path, detail=False) if fs.exists(path) else []


def check(url: str, fs, ref: dict, n_rows: int) -> dict:
    """The store against the reference: lost / duplicated samples, records, differing shards."""
    from kdship.store import StoreReader

    r = StoreReader(url)
    shards = {p: r.read_shard(p) for p in r.shard_paths}  # checksums verified on read
    counts = Counter(int(s["sample_index"]) for s in r.iter_samples())
    differ = [p for p in ref if p not in shards or any(not np.array_equal(getattr(ref[p], a), getattr(shards[p], a)) for a in COMPARED_ARRAYS)]
    return {
        "complete": bool(r.header.get("complete")),
        "shards": len(shards),
        "records": len(_records(fs, url)),
        "lost": sum(1 for i in range(n_rows) if counts[i] == 0),
        "duplicated": sum(1 for c in counts.values() if c > 1),
        "differ": len(differ),
    }


def run_processes(teacher, data, url, fs, env, writers: int, kill: int, n_rows: int, rng: random.Random) -> dict:
    """W writer processes at once, K killed at random points, the K rerun."""
    t0 = time.time()
    procs = [subprocess.Popen(cache_cmd(teacher, data, url, "--num-shards", str(writers), "--shard-index", str(i)), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(writers)]  # fmt: skip
    victims = sorted(rng.sample(range(writers), kill))
    per_writer = -(-n_rows // writers)
    # each victim dies after a random number of its own commits (0 .. all but one) and a random delay
    plan = {i: (rng.randrange(0, per_writer - 1), rng.uniform(0.0, 0.4)) for i in victims}
    killed = {}

    def mine(i):
        return sum(1 for p in _records(fs, url) if int(Path(p).stem.lstrip("s")) % writers == i)

    while len(killed) < kill and time.time() - t0 < 900:
        for i in victims:
            if i in killed:
                continue
            n_done, delay = plan[i]
            if procs[i].poll() is not None:
                killed[i] = ("finished before its kill", mine(i))
            elif mine(i) >= n_done:
                time.sleep(delay)
                procs[i].send_signal(signal.SIGKILL)
                procs[i].wait()
                killed[i] = ("SIGKILL", mine(i))
        time.sleep(0.05)
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=900)
        if i not in victims and p.returncode != 0:
            raise SystemExit(f"writer {i} failed:\n{err[-2000:]}")
    at_kill = check(url, fs, {}, n_rows)
    rerun = [subprocess.Popen(cache_cmd(teacher, data, url, "--num-shards", str(writers), "--shard-index", str(i), "--json"), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in victims]  # fmt: skip
    skipped = []
    for i, p in zip(victims, rerun):
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"rerun of writer {i} failed:\n{err[-2000:]}")
        skipped.append(json.loads(out[out.rindex('{\n "store"'):])["shards_skipped"])
    return {"victims": victims, "killed": killed, "at_kill": at_kill, "rerun_skipped": skipped, "seconds": time.time() - t0}


def run_ray(teacher, data, url, fs, env, writers: int, kill: int, n_rows: int, rng: random.Random) -> dict:
    """`cache --ray` with W tasks; K task processes SIGKILLed at random points; Ray retries them."""
    import psutil
    import ray

    from kdship.cache.ray_runner import cache_with_ray

    ray.init(num_cpus=writers, num_gpus=0, include_dashboard=False, object_store_memory=80 << 20,
             runtime_env={"env_vars": {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}}, log_to_driver=False)  # fmt: skip
    t0 = time.time()
    result: dict = {}

    def drive():
        try:
            result["summary"] = cache_with_ray(str(teacher), str(data), url, address="local", workers=writers, retries=kill + 1, backend="hf", shard_size=1)
        except Exception as e:  # reported below: a failed run is a result too
            result["error"] = repr(e)

    driver = threading.Thread(target=drive)
    driver.start()
    kills, seen = [], set()
    # kill K distinct task processes, each once a random number of commits has landed store-wide
    thresholds = sorted(rng.randrange(0, n_rows - writers) for _ in range(kill))
    while driver.is_alive() and len(kills) < kill and time.time() - t0 < 900:
        tasks = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::_cache_part")]
        fresh = [p for p in tasks if p.pid not in seen]
        if fresh and len(_records(fs, url)) >= thresholds[len(kills)]:
            victim = rng.choice(fresh)
            time.sleep(rng.uniform(0.0, 0.4))
            try:
                victim.send_signal(signal.SIGKILL)
                kills.append(len(_records(fs, url)))
            except psutil.NoSuchProcess:
                pass
            seen.add(victim.pid)
        time.sleep(0.05)
    driver.join()
    ray.shutdown()
    if "error" in result:
        raise SystemExit(f"cache --ray failed: {result['error']}")
    return {"kills": kills, "tasks": result["summary"].get("tasks", []), "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="rows = shards (--shard-size 1)")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--kill", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    args = ap.parse_args()

    import s3fs

    from kdship.cache.run import cache
    from kdship.tiny import build_tiny_llama, synthetic_sentences, write_jsonl
    from run_all import combine_area, machine_with_load
    from s3_stores import S3_ENV, start_moto_server

    work = Path(tempfile.mkdtemp(prefix="kdship-s3-bench-"))
    teacher = build_tiny_llama(work / "teacher", hidden=128, layers=2, heads=2, kv_heads=1, seed=0)
    sents = synthetic_sentences(6 * args.rows, seed=7)
    data = write_jsonl(work / "rows.jsonl", [{"text": " ".join(sents[i : i + 6])} for i in range(0, 6 * args.rows, 6)])
    cache(str(teacher), str(data), str(work / "ref"), backend="hf", shard_size=1, progress=False)
    from kdship.store import StoreReader

    ref_reader = StoreReader(str(work / "ref"))
    ref = {p: ref_reader.read_shard(p) for p in ref_reader.shard_paths}

    server, endpoint = start_moto_server(work / "moto.log")
    try:
        env = {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint}
        os.environ.update(env)
        import fsspec.config

        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("kdship-bench")
        rng = random.Random(args.seed)
        sub_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        procs = run_processes(teacher, data, "s3://kdship-bench/processes", fs, sub_env, args.writers, args.kill, args.rows, rng)
        procs["check"] = check("s3://kdship-bench/processes", fs, ref, args.rows)
        print("processes:", json.dumps(procs, default=str), flush=True)
        rayed = run_ray(teacher, data, "s3://kdship-bench/ray", fs, env, args.writers, args.kill, args.rows, rng)
        rayed["check"] = check("s3://kdship-bench/ray", fs, ref, args.rows)
        print("ray:", json.dumps({k: v for k, v in rayed.items() if k != "tasks"}, default=str), flush=True)
    finally:
        server.terminate()
        server.wait(30)

    def row(name, c, killed, secs):
        return f"| {name} | {killed} | {c['shards']}/{args.rows} | {c['records']} | {c['lost']} | {c['duplicated']} | {c['differ']} | {'yes' if c['complete'] else 'NO'} | {secs:.0f} |"

    n_killed = sum(1 for how, _ in procs["killed"].values() if how == "SIGKILL")
    kill_points = ", ".join(f"writer {i} after {n} of its commits" + ("" if how == "SIGKILL" else f" ({how})") for i, (how, n) in sorted(procs["killed"].items()))
    ok = all(c["lost"] == c["duplicated"] == c["differ"] == 0 and c["shards"] == c["records"] == args.rows and c["complete"] for c in (procs["check"], rayed["check"]))
    lines = [
        "## Many writers on S3, most of them killed (bench/cache_s3_writers.py)",
        "",
        f"Machine: {machine_with_load()}. Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Store: s3:// on moto's S3 server (127.0.0.1, s3fs); {args.rows} rows of a tiny random Llama teacher (`--backend hf`, "
        f"`--shard-size 1`: {args.rows} shards); reference: one process's local store of the same rows. Kill points seeded ({args.seed}).",
        "",
        "| run | writers SIGKILLed | shards in store | commit records | samples lost | samples duplicated | shards differing from reference | complete | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        row(f"{args.writers} processes (`--num-shards {args.writers}`), killed ones rerun", procs["check"], f"{n_killed} of {args.writers}", procs["seconds"]),
        row(f"`--ray local`, {args.writers} tasks, Ray retries", rayed["check"], f"{len(rayed['kills'])} of {args.writers}", rayed["seconds"]),
        "",
        f"Processes: {kill_points}; before the rerun the store held {procs['at_kill']['shards']} shards; the reruns skipped "
        f"{procs['rerun_skipped']} committed shards. Ray: task processes killed when the store held {rayed['kills']} commits.",
        "",
        f"Every shard exactly once and arrays identical to the single-writer store, both runs: **{'yes' if ok else 'NO'}**.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cache_s3_writers.md").write_text("\n".join(lines), encoding="utf-8")
    combine_area("cache")
    print("\n".join(lines))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
