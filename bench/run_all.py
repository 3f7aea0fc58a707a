"""Run every benchmark script in bench/ and merge their sections into bench/RESULTS.md.

Each ``bench/<area>_*.py`` writes ``bench/results/<area>.md``; this script runs them one after the
other (never in parallel: ratios are measured side by side inside each script, on a quiet machine),
then concatenates the sections. ``--merge-only`` skips running and just rebuilds RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = ["cache", "train", "student", "export", "serve", "eval", "demo"]


def machine() -> str:
    import os

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def machine_with_load() -> str:
    """``machine()`` plus the 1-minute load average now: a script writes it next to its figures."""
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{machine()}, CPU only; load average {load:.1f} when this was written"


# the areas whose scripts' sections are combined into results/<area>.md: title, then sections in this order
# (any other results/<area>_*.md after them, by name), so no script's section drops another's
AREAS = {
    "cache": ("kdship cache benchmarks", ("cache_overhead.md", "cache_bytes.md", "cache_bytes_headtail.md")),
    "train": ("kdship train benchmarks", ("train_throughput.md", "train_fidelity.md", "train_fidelity_smollm2.md", "train_recipe_demo.md",
                                          "train_hint_demo.md", "train_onpolicy_demo.md")),
    "serve": ("kdship serve benchmarks", ("serve_load.md", "serve_abuse.md")),
}


def combine_area(area: str, out: Path | None = None) -> Path:
    """Write ``results/<area>.md`` (or ``out``): the area's title and every ``results/<area>_*.md`` section."""
    title, first = AREAS[area]
    res = BENCH / "results"
    names = [n for n in first if (res / n).is_file()]
    names += sorted(p.name for p in res.glob(f"{area}_*.md") if p.name not in names)
    out = out or res / f"{area}.md"
    out.write_text(f"# {title}\n\n" + "\n".join((res / n).read_text() for n in names), encoding="utf-8")
    return out


def merge(out: Path | None = None) -> Path:
    """Write RESULTS.md (or ``out``) from the sections in bench/results/: only from what scripts wrote."""
    sections = sorted((BENCH / "results").glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    # an area that already combines its scripts' parts in <area>.md is not repeated from <area>_*.md
    combined = {p.stem for p in sections}
    sections = [p for p in sections if p.stem.split("_", 1)[0] == p.stem or p.stem.split("_", 1)[0] not in combined]
    parts = [
        "# kdship benchmark results\n",
        "Produced by `make bench` (`bench/run_all.py`), which runs each `bench/<area>_*.py` script; each script "
        "measures its ratios side by side in one run and writes `bench/results/<area>.md`, merged here. "
        "Speed goals live here, never in timed tests.\n",
    ]
    parts += [p.read_text(encoding="utf-8").rstrip() + "\n" for p in sections]
    out = out or BENCH / "RESULTS.md"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def bench_scripts() -> list[Path]:
    """The scripts `make bench` runs: every ``bench/<area>_*.py`` with a ``__main__`` block, by name. Not this
    script, not helpers imported by scripts (demo_budget.py), not gpu_* (run on a lent GPU machine by
    bench/gpu.sh and recorded by gpu_record.py, docs/gpu.md)."""
    return [p for p in sorted(BENCH.glob("*_*.py"))
            if p.name != Path(__file__).name and not p.name.startswith("gpu_") and 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--merge-only", action="store_true")
    args = ap.parse_args()
    failed = []
    if not args.merge_only:
        print("machine:", machine())
        for script in bench_scripts():
            print(f"== {script.name}", flush=True)
            rc = subprocess.call([sys.executable, str(script)], cwd=BENCH.parent)
            if rc != 0:
                failed.append(f"{script.name} (exit {rc})")
    print("wrote", merge())
    if failed:  # the sections of the scripts that ran are merged; `make bench` still fails
        sys.exit("bench scripts failed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
