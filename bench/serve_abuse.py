"""The ONNX endpoint under 200 concurrent streams, with and without 20 abusive clients beside them.

One `kdship serve --backend onnx` child process on 127.0.0.1 (the model of bench/serve_load.py: a
~10M-parameter random Llama exported by `kdship.export`), two conditions on the same server, each run twice in ABBA order (clean, abused, abused, clean):
  * clean: N well-formed streaming `/v1/completions` requests sent at once;
  * abused: the same N requests, and at the same moment 20 abusive clients, 4 of each kind:
    a 10 MB body (Content-Length says so), a 1 MB prompt (under the 1 MiB body limit: the server must
    tokenise it, off the event loop, before refusing it as over the context), malformed JSON, a slow
    client (a bad request trickled one byte at a time for ~8 s), and a client that disconnects after
    the third token of a 200-token stream.
Measured per phase, client side: requests answered 200 with every token, the inter-token latency
(gap between successive SSE token events of one stream, all streams pooled) p50/p99, TTFT p99;
each abusive request's status; whether the server still answers afterwards.

    .venv/bin/python bench/serve_abuse.py [--streams 200] [--output-tokens 16] [--max-batch 64]

Writes bench/results/serve_abuse.md (merged into bench/results/serve.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))


async def stream(client, url: str, prompt: str, tokens: int) -> dict:
    """One well-formed streaming completion: status, tokens the server reports, arrival times of its
    text events (one per token; a token whose text is held back, e.g. half a UTF-8 character, comes
    with the next)."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, completion_tokens = [], None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "times": [], "t0": t0, "tokens": None}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("text") and choice.get("finish_reason") is None:
                        times.append(time.perf_counter())
    except Exception as e:  # a transport error is a failed request, counted
        return {"status": type(e).__name__, "times": times, "t0": t0, "tokens": completion_tokens}
    return {"status": 200, "times": times, "t0": t0, "tokens": completion_tokens}


async def raw(url: str, head: bytes, body: bytes, trickle_s: float = 0.0) -> int | str:
    """A hand-written request over a socket (to send what a client library would not, and slowly).
    The head goes first and the answer is awaited briefly before the body, as a client sending
    ``Expect: 100-continue`` would: a server refusing on Content-Length answers at once, and closes the
    connection while a 10 MB body would still be in flight."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(head)
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), 1.0)
            return int(line.split(b" ", 2)[1]) if line else "closed"
        except asyncio.TimeoutError:
            pass  # no early answer: send the body
        if trickle_s:
            for i in range(len(body)):
                writer.write(body[i : i + 1])
                await writer.drain()
                await asyncio.sleep(trickle_s / len(body))
        else:
            writer.write(body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 120)
        return int(line.split(b" ", 2)[1]) if line else "closed"
    except (ConnectionError, asyncio.TimeoutError) as e:
        return type(e).__name__
    finally:
        writer.close()


def _post(path: str, body_len: int) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n".encode()


async def disconnect_mid_stream(client, url: str, prompt: str) -> int | str:
    body = {"prompt": prompt, "max_tokens": 200, "stream": True, "ignore_eos": True}
    n = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                break  # leaving the block closes the connection mid-stream
    return f"{status}, left after 3 tokens"


def abusers(client, url: str, prompt: str) -> list:
    big = b'{"prompt": "' + b"x" * (10 << 20) + b'"}'
    mb_prompt = json.dumps({"prompt": "the cat sat " * 87_000, "max_tokens": 4}).encode()  # ~1.04 MB, under the 1 MiB limit
    bad_json = b'{"prompt": "hello", "max_tokens": 4'
    slow = json.dumps({"prompt": "slow", "max_tokens": -1}).encode()
    jobs = []
    for _ in range(4):
        jobs += [
            ("10 MB body", raw(url, _post("/v1/completions", len(big)), big)),
            ("1 MB prompt", raw(url, _post("/v1/completions", len(mb_prompt)), mb_prompt)),
            ("malformed JSON", raw(url, _post("/v1/completions", len(bad_json)), bad_json)),
            ("slow client (~8 s)", raw(url, _post("/v1/completions", len(slow)), slow, trickle_s=8.0)),
            ("disconnect mid-stream", disconnect_mid_stream(client, url, prompt)),
        ]
    return jobs


async def phase(url: str, prompts: list[str], tokens: int, abuse: bool) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 40, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        well = [stream(client, url, p, tokens) for p in prompts]
        bad = abusers(client, url, prompts[0]) if abuse else []
        results = await asyncio.gather(*well, *(job for _, job in bad))
    streams, abuse_status = results[: len(well)], results[len(well) :]
    itl = [b - a for s in streams for a, b in zip(s["times"], s["times"][1:])]
    ttft = [s["times"][0] - s["t0"] for s in streams if s["times"]]
    kinds: dict[str, list] = {}
    for (kind, _), status in zip(bad, abuse_status):
        kinds.setdefault(kind, []).append(status)
    return {
        "answered": sum(1 for s in streams if s["status"] == 200 and s["tokens"] == tokens),
        "streams": len(streams),
        "itl": itl,
        "ttft": ttft,
        "abuse": kinds,
    }


def pooled(phases: list[dict]) -> dict:
    """One condition's phases together: streams answered, latency percentiles over all of them."""
    itl = [x for p in phases for x in p["itl"]]
    ttft = [x for p in phases for x in p["ttft"]]
    kinds: dict[str, list] = {}
    for p in phases:
        for k, v in p["abuse"].items():
            kinds.setdefault(k, []).extend(v)
    return {
        "answered": sum(p["answered"] for p in phases),
        "streams": sum(p["streams"] for p in phases),
        "itl_p50": float(np.percentile(itl, 50)) if itl else float("nan"),
        "itl_p99": float(np.percentile(itl, 99)) if itl else float("nan"),
        "ttft_p99": float(np.percentile(ttft, 99)) if ttft else float("nan"),
        "abuse": kinds,
        "p99_each": [float(np.percentile(p["itl"], 99)) if p["itl"] else float("nan") for p in phases],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()

    import httpx

    from kdship.profile.run import synthetic_prompt
    from kdship.runtime.server_process import launch
    from kdship.tiny import build_tiny_llama
    from run_all import combine_area, machine_with_load

    work = Path(args.work or tempfile.mkdtemp(prefix="kdship-serve-abuse-"))
    model_dir, export_dir = work / "model", work / "export"
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir, hidden=args.hidden, layers=args.layers, heads=args.hidden // 64, kv_heads=max(1, args.hidden // 256), seed=0, init_range=0.02)
    if not (export_dir / "onnx" / "kdship_onnx.json").is_file():
        from kdship.export.run import export

        export(model_dir, export_dir, formats=("onnx",), verify=False)
    prompts = [synthetic_prompt(args.prompt_words, i) for i in range(args.streams)]
    load_before = os.getloadavg()[0]
    h = launch(export_dir, backend="onnx", max_batch=args.max_batch, max_queue=args.streams + 64, insecure_no_auth=False)
    try:
        asyncio.run(phase(h.url, prompts[:8], args.output_tokens, abuse=False))  # warm-up
        # ABBA order, so that neither condition gains from running later (a warmer server, a quieter machine)
        runs = {False: [], True: []}
        for abuse in (False, True, True, False):
            runs[abuse].append(asyncio.run(phase(h.url, prompts, args.output_tokens, abuse=abuse)))
            print("abused:" if abuse else "clean:", {k: v for k, v in runs[abuse][-1].items() if k != "itl"}, flush=True)
        clean, abused = pooled(runs[False]), pooled(runs[True])
        alive = httpx.post(h.url + "/v1/completions", json={"prompt": "still there?", "max_tokens": 4}, timeout=60).status_code == 200
        alive = alive and h.process.poll() is None
    finally:
        h.stop()
    load_after = os.getloadavg()[0]

    ratio = abused["itl_p99"] / clean["itl_p99"]
    n = args.streams

    def ms(x):
        return f"{1000 * x:.0f}"

    def statuses(st):
        counts: dict[str, int] = {}
        for x in st:
            counts[str(x)] = counts.get(str(x), 0) + 1
        return ", ".join(f"{k} ×{c}" for k, c in counts.items())

    abuse_rows = [f"| {kind} | {len(st)} | {statuses(st)} |" for kind, st in abused["abuse"].items()]
    four_xx = all(isinstance(s, int) and 400 <= s < 500 for kind, st in abused["abuse"].items() if kind != "disconnect mid-stream" for s in st)
    lines = [
        "## The endpoint under abuse (bench/serve_abuse.py)",
        "",
        f"Machine: {machine_with_load()}; 1-minute load {load_before:.1f} at the start, {load_after:.1f} at the end. "
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Server: `kdship serve --backend onnx --max-batch {args.max_batch}` on 127.0.0.1 (random Llama, hidden {args.hidden}, "
        f"{args.layers} layers, fp32 ONNX), default 1 MiB body limit. Load: {n} concurrent streaming completions "
        f"(~{args.prompt_words}-word prompts, {args.output_tokens} tokens, greedy, ignore_eos), client and server on the same cores.",
        "",
        "| phase | well-formed streams answered in full | inter-token latency p50 ms | p99 ms (each run) | TTFT p99 ms |",
        "|---|---:|---:|---:|---:|",
        f"| {n} streams alone (2 runs) | {clean['answered']}/{clean['streams']} | {ms(clean['itl_p50'])} | {ms(clean['itl_p99'])} "
        f"({', '.join(ms(x) for x in clean['p99_each'])}) | {ms(clean['ttft_p99'])} |",
        f"| {n} streams + 20 abusive clients (2 runs) | {abused['answered']}/{abused['streams']} | {ms(abused['itl_p50'])} | {ms(abused['itl_p99'])} "
        f"({', '.join(ms(x) for x in abused['p99_each'])}) | {ms(abused['ttft_p99'])} |",
        "",
        "| abusive request | count | status each got |",
        "|---|---:|---|",
        *abuse_rows,
        "",
        f"p99 inter-token latency with abuse ÷ without: **{ratio:.2f}×** (goal ≤ 1.5×). Every well-formed stream answered in both "
        f"runs: **{'yes' if clean['answered'] == clean['streams'] and abused['answered'] == abused['streams'] else 'NO'}**; every abusive request (but the "
        f"disconnects, which get no status) a 4xx: **{'yes' if four_xx else 'NO'}**; the server answered a request afterwards: "
        f"**{'yes' if alive else 'NO'}**.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_abuse.md").write_text("\n".join(lines), encoding="utf-8")
    combine_area("serve")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
