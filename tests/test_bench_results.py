"""bench/RESULTS.md and the combined area files are exactly what the scripts' sections regenerate.

Every figure in RESULTS.md comes from a section a bench script wrote into bench/results/; this checks
that rebuilding the combined files from those sections reproduces the committed ones byte for byte (so
nothing was edited by hand in the merged files, and no section is dropped by the merge).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import run_all  # noqa: E402


@pytest.mark.parametrize("area", sorted(run_all.AREAS))
def test_area_file_is_its_sections_combined(area, tmp_path):
    committed = BENCH / "results" / f"{area}.md"
    assert committed.is_file(), f"{committed} missing: run `python bench/run_all.py --merge-only` after a bench script"
    rebuilt = run_all.combine_area(area, out=tmp_path / f"{area}.md")
    assert rebuilt.read_text() == committed.read_text(), f"{committed} differs from its sections combined: edit the sections' scripts, not the file"
    for p in (BENCH / "results").glob(f"{area}_*.md"):  # every section of the area is in it
        assert p.read_text() in committed.read_text(), p.name


def test_results_md_is_the_merge_of_every_section(tmp_path):
    rebuilt = run_all.merge(out=tmp_path / "RESULTS.md")
    committed = (BENCH / "RESULTS.md").read_text()
    assert rebuilt.read_text() == committed, "bench/RESULTS.md differs from `python bench/run_all.py --merge-only`'s output"
    for p in (BENCH / "results").glob("*.md"):
        if p.stem.split("_", 1)[0] not in run_all.AREAS:
            assert p.read_text().rstrip() in committed, p.name


def test_make_bench_runs_every_script_and_fails_when_one_fails(tmp_path):
    """run_all runs each `<area>_*.py` with a __main__ block (not helpers), merges what the scripts that ran
    wrote, and exits non-zero naming the script that failed (so `make bench` fails)."""
    import shutil
    import subprocess

    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    shutil.copy(BENCH / "run_all.py", bench / "run_all.py")
    main = 'if __name__ == "__main__":\n'
    (bench / "cache_ok.py").write_text(
        "from pathlib import Path\n" + main + "    (Path(__file__).parent / 'results' / 'cache_ok.md').write_text('## ok section\\n')\n")
    (bench / "train_broken.py").write_text(main + "    raise SystemExit(3)\n")
    (bench / "demo_helper.py").write_text("raise SystemExit('a helper module must not be run as a script')\n")
    r = subprocess.run([sys.executable, str(bench / "run_all.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "train_broken.py (exit 3)" in r.stderr
    assert "demo_helper.py" not in r.stdout + r.stderr
    assert "## ok section" in (bench / "RESULTS.md").read_text()
    assert [p.name for p in run_all.bench_scripts()] and "demo_budget.py" not in [p.name for p in run_all.bench_scripts()]


def test_every_section_has_a_script_that_make_bench_runs():
    """`make bench` regenerates every section: each bench/results/<name>.md (not an area's combined file,
    not gpu.md, which bench/gpu_record.py writes from a lent GPU machine's run) is written by one of the
    scripts run_all runs, found by its file name in the script's text or the script's own name."""
    scripts = {p: p.read_text(encoding="utf-8") for p in run_all.bench_scripts()}
    orphans = []
    for md in sorted((BENCH / "results").glob("*.md")):
        if md.stem in run_all.AREAS or md.stem == "gpu":
            continue
        if not any(p.stem == md.stem or f"{md.stem}.md" in text or f'"{md.stem}"' in text for p, text in scripts.items()):
            orphans.append(md.name)
    assert not orphans, f"sections no bench script writes (make bench could not regenerate them): {orphans}"
