"""`kdship serve --backend vllm`: vLLM's own OpenAI server on the exported HF folder, started once,
asked once (plus the API key check), stopped with SIGTERM."""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import API_KEY, exported_student_dir


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_student):
    return exported_student_dir(tmp_path_factory, tiny_student)


def test_vllm_command_line_on_cpu(export_dir):
    from kdship.runtime.server_process import resolve_model_dir
    from kdship.serve.server import vllm_command

    hf = resolve_model_dir(export_dir, "vllm")
    assert hf == export_dir / "hf"
    cmd, env = vllm_command(hf, "127.0.0.1", 8123, 4, None, "student", on_cuda=False)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--dtype") + 1] == "float32" and "--enforce-eager" in cmd
    assert cmd[cmd.index("--max-num-seqs") + 1] == "4"
    assert cmd[cmd.index("--max-model-len") + 1] == "512"  # the tiny model's max_position_embeddings
    assert env["VLLM_CPU_KVCACHE_SPACE"]


def test_vllm_server_answers_once_and_stops(export_dir, ort_greedy_reference):
    from kdship.runtime.server_process import launch

    h = launch(export_dir, backend="vllm", api_key=API_KEY, max_batch=4, max_model_len=128, startup_timeout=240)
    try:
        assert httpx.get(h.url + "/v1/models").status_code == 401
        models = httpx.get(h.url + "/v1/models", headers=h.headers()).json()
        assert [m["id"] for m in models["data"]] == ["student"]
        prompt, expected = ort_greedy_reference
        body = {"model": "student", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(h.url + "/v1/completions", json=body, headers=h.headers(), timeout=120)
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["usage"]["completion_tokens"] == 8
        # Same weights, two runtimes: vLLM's greedy answer equals the ONNX export's.
        assert j["choices"][0]["text"] == expected
    finally:
        code = h.stop(timeout=60)
    assert code is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(h.url + "/health", timeout=2)


@pytest.fixture(scope="module")
def ort_greedy_reference(export_dir):
    from kdship.runtime.onnx import OnnxCausalLM

    m = OnnxCausalLM(export_dir / "onnx")
    prompt = "The small cat finds a fish"
    out = m.generate([m.tokenizer(prompt).input_ids], 8, stop_token_ids=[])[0]
    return prompt, m.tokenizer.decode(out, skip_special_tokens=True)
