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
