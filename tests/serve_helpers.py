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


def raw_http(url: str, head: bytes, body_parts: tuple[bytes, ...] = (), timeout: float = 30.0) -> tuple[int, bytes]:
    """Send a hand-written HTTP/1.1 request over a plain socket (to control exactly which body bytes
    go out, and when) and read the response until the server closes: (status, body)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_out, _, body = data.partition(b"\r\n\r\n")
    return int(head_out.split(b" ", 2)[1]), body
