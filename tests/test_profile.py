"""`kdship profile`: a short real load test of two ONNX endpoints (one started by profile itself from
the export folder, one already running with batching off) producing report.json, report.md and PNGs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from serve_helpers import exported_student_dir


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_student):
    return exported_student_dir(tmp_path_factory, tiny_student)


def test_profile_two_targets_writes_report(export_dir, tmp_path):
    from kdship.profile.run import profile
    from kdship.runtime.server_process import launch

    out = tmp_path / "report"
    with launch(export_dir, backend="onnx", max_batch=1) as one_at_a_time:
        report = profile(
            [{"name": "batched", "model": str(export_dir), "backend": "onnx"}, f"unbatched={one_at_a_time.url}"],
            concurrency=(1, 4),
            requests=6,
            prompt_tokens=12,
            output_tokens=8,
            out=out,
            warmup=1,
            show_progress=False,
        )
    for name in ("report.json", "report.md", "latency.png", "throughput.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    for png in ("latency.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk["targets"]) == {"batched", "unbatched"}
    for t in on_disk["targets"].values():
        assert [lv["concurrency"] for lv in t["levels"]] == [1, 4]
        for lv in t["levels"]:
            assert lv["completed"] == lv["requests"] == 6 and lv["errors"] == 0
            assert lv["mean_output_tokens"] == 8  # ignore_eos: fixed-length answers
            assert lv["mean_prompt_tokens"] >= 12
            for key in ("ttft_s", "e2e_s"):
                assert 0 < lv[key]["p50"] <= lv[key]["p95"] <= lv[key]["p99"]
            assert lv["ttft_s"]["p50"] <= lv["e2e_s"]["p50"]
            assert lv["itl_s"]["n"] > 0 and lv["output_tokens_per_s"] > 0 and lv["requests_per_s"] > 0
    md = (out / "report.md").read_text()
    assert "## batched" in md and "## unbatched" in md and "![latency.png](latency.png)" in md
    assert report["targets"]["batched"]["model"] == "student"
    # profile started the "batched" server and stopped it afterwards
    import httpx

    with pytest.raises(httpx.ConnectError):
        httpx.get(report["targets"]["batched"]["url"] + "/health", timeout=2)


def test_profile_refuses_non_loopback_and_bad_options(tmp_path):
    from kdship.profile.run import ProfileError, profile

    with pytest.raises(ProfileError, match="not a loopback address"):
        profile(["remote=http://192.0.2.10:8000"], out=tmp_path)
    with pytest.raises(ProfileError, match="concurrency"):
        profile(["x=http://127.0.0.1:9"], concurrency=(0,), out=tmp_path)
    with pytest.raises(ProfileError, match="distinct"):
        profile(["a=http://127.0.0.1:9", "a=http://127.0.0.1:10"], out=tmp_path)
    r = subprocess.run([sys.executable, "-m", "kdship", "profile", "--target", "nourl", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "NAME=URL" in r.stderr


def test_profile_counts_failed_requests(export_dir, tmp_path):
    """Requests the server rejects are counted as errors with their reason, not a crash; a wrong key
    fails up front with the status named."""
    from kdship.profile.run import ProfileError, profile
    from kdship.runtime.server_process import launch

    with launch(export_dir, backend="onnx", api_key="right-key", max_model_len=16) as h:
        with pytest.raises(ProfileError, match="401"):
            profile([f"s={h.url}"], concurrency=(1,), requests=1, out=tmp_path, api_key="wrong-key", show_progress=False)
        # 40-word prompts do not fit a 16-token context: every request gets a 400.
        rep = profile([f"s={h.url}"], concurrency=(2,), requests=3, prompt_tokens=40, output_tokens=4, out=tmp_path, api_key="right-key", warmup=0, show_progress=False)
    lv = rep["targets"]["s"]["levels"][0]
    assert lv["requests"] == 3 and lv["errors"] == 3 and lv["completed"] == 0
    assert "HTTP 400" in lv["first_errors"][0]
    assert "Errors (first)" in (tmp_path / "report.md").read_text()
