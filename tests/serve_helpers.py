"""Shared by tests/test_serve*.py and tests/test_profile*.py: one `kdship export` of the tiny student
per test session (HF + ONNX + int8), made with the exporter's public API and reused across modules."""

from __future__ import annotations

from pathlib import Path

import httpx

API_KEY = "sk-kdship-test"


def exported_student_dir(tmp_path_factory, tiny_student) -> Path:
    out = tmp_path_factory.getbasetemp() / "serve_export" / "student"
    if not (out / ".kdship_serve_tests_done").is_file():
        from kdship.export.run import export

        export(tiny_student, out, formats=("hf", "onnx"), quantize="int8", verify=False)
        (out / ".kdship_serve_tests_done").write_text("ok")
    return out


def sse_events(client: httpx.Client, path: str, body: dict) -> list:
    """POST with stream=True and return the parsed `data:` payloads (the final "[DONE]" as a string)."""
    import json

    events = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events
