"""Record a GPU run's results: bench/results/gpu.md (+ gpu_results.json), then RESULTS.md re-merged.

Run HERE after the device call of bench/gpu.sh (docs/gpu.md), with what came back from $OUT:
    python bench/gpu_record.py /work/.device/<...>/gpu_results.json     (or the folder holding it)
Several calls of one session (a second one timing what the first one's budget left out): name them all,
oldest first; the section then holds one part per call.
The section is rendered from the JSON by bench/gpu_bench.py's ``render_md`` (the same text as the
returned gpu.md). A CPU rehearsal is refused: bench/results/gpu.md only ever holds a CUDA run.
Not a benchmark: bench/run_all.py skips bench/gpu_*.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from gpu_bench import git_head, render_runs, source_sha256  # noqa: E402
from run_all import merge  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="the returned gpu_results.json, or the folder holding it (gpu.md beside it is not needed); several: oldest first")
    ap.add_argument("--no-merge", action="store_true", help="write bench/results/gpu.md only, not RESULTS.md")
    a = ap.parse_args()
    runs = [read_run(Path(r)) for r in a.results]
    (BENCH / "results" / "gpu_results.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    (BENCH / "results" / "gpu.md").write_text(render_runs(runs))
    print("wrote", BENCH / "results" / "gpu.md")
    if not a.no_merge:
        print("wrote", merge())


def read_run(src: Path) -> dict:
    """One device call's results; a CPU rehearsal is refused."""
    if src.is_dir() or src.name == "gpu.md":
        src = (src if src.is_dir() else src.parent) / "gpu_results.json"
    res = json.loads(src.read_text())
    if res.get("kind") != "cuda":
        sys.exit(f"{src}: a {res.get('kind')} run, not a CUDA one; bench/results/gpu.md keeps only GPU measurements")
    if not res.get("kdship_commit"):  # the device has no .git: the commit is this checkout's, if the code is the same
        if res.get("source_sha256") != source_sha256():
            sys.exit(f"{src}: the kdship code that ran differs from this checkout's; check out the commit that was sent and record again")
        res["kdship_commit"] = git_head()
    return res


if __name__ == "__main__":
    main()
