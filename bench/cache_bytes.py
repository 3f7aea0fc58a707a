"""Bytes per position of a kdship store and the error of its lossy logprob encoding.

For the tiny test teacher and the real SmolLM2-135M-Instruct (49,152-token vocabulary), on real
chat text (chitchat-dataset, rendered with the teacher's chat template): the exact top-k (k = 8,
32, 128) from a float32 transformers forward pass is written into real stores under several
encodings; we report bytes on disk per position (all arrays of the shard: tokens, offsets,
loss_mask, hashes, ids, logprobs) and the encoding error as KL(exact top-k || decoded top-k), both
renormalised over the k stored entries, in nat (mean, p99, max over positions).

Anchors: DistillKit's README ~114 B/token at k=50 and ~300 B at k=128; naive int64 id + fp32
logprob = 12 B per entry (384 B at k=32). Goal: <= half of DistillKit at the same k (interpolated
linearly in k: ~2.3 B per entry), decoded top-k within 1e-3 nat KL.

    .venv/bin/python bench/cache_bytes.py [--conversations 40] [--skip-smollm]
Writes bench/results/cache.md (the bytes section; cache_overhead.py writes its own section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdship.store import Shard, StoreReader, StoreWriter, default_encoding  # noqa: E402

KS = (8, 32, 50, 128)
ENCODINGS = {
    "fp32, lossless (bitshuffle+zstd)": {"compressor": "blosc-zstd-bitshuffle", "clevel": 5},
    "BitRound 9 bits": {"topk_logprobs": {"bitround_keepbits": 9}, "clevel": 5},
    "BitRound 7 bits": {"topk_logprobs": {"bitround_keepbits": 7}, "clevel": 5},
    "BitRound 5 bits": {"topk_logprobs": {"bitround_keepbits": 5}, "clevel": 5},
    "BitRound 4 bits": {"topk_logprobs": {"bitround_keepbits": 4}, "clevel": 5},
    "transpose + BitRound 5": {"topk_logprobs": {"bitround_keepbits": 5}, "transpose_topk": True, "clevel": 5},
    "BitRound 5, zstd 9": {"topk_logprobs": {"bitround_keepbits": 5}, "clevel": 9},
}
MACHINE = f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU, load average {os.getloadavg()[0]:.1f} at start"


def kl_topk(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, p and q the softmax of the k stored logprobs (-inf = absent)."""
    def norm(x):
        x = x.astype(np.float64)
        m = np.max(x, axis=1, keepdims=True)
        e = np.exp(x - m)
        e[~np.isfinite(x)] = 0
        return e / e.sum(1, keepdims=True)

    p, q = norm(exact), norm(decoded)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * (np.log(p) - np.log(np.where(q > 0, q, 1e-300))), 0.0)
    return t.sum(1)


def teacher_rows(teacher: str, n_conv: int, kmax: int):
    """Exact top-kmax (float32 forward) for chitchat conversations rendered with the chat template."""
    from kdship.cache.hf_backend import HFBackend
    from kdship.render import load_tokenizer, render_score
    from kdship.data import Row
    from kdship.demo.assets import chitchat_conversations

    tok = load_tokenizer(teacher)
    convs = chitchat_conversations()[:n_conv]
    samples = []
    for i, c in enumerate(convs):
        turns = c[:6] if len(c[:6]) % 2 == 0 else c[:5]
        msgs = [{"role": ("user", "assistant")[j % 2], "content": t} for j, t in enumerate(turns)]
        ids, mask = render_score(Row(i, "", "messages", messages=msgs), tok)
        samples.append((ids[:256], mask[:256]))
    be = HFBackend(teacher)
    res = be.score([s[0].tolist() for s in samples], kmax)
    return [dict(tokens=s[0], loss_mask=s[1], topk_ids=r[0], topk_logprobs=r[1], sample_index=i) for i, (s, r) in enumerate(zip(samples, res))]


def measure(rows, k: int, encoding: dict, workdir: str):
    samples = [dict(r, topk_ids=r["topk_ids"][:, :k], topk_logprobs=r["topk_logprobs"][:, :k]) for r in rows]
    url = os.path.join(workdir, f"k{k}-{abs(hash(json.dumps(encoding, sort_keys=True)))}")
    header = {"mode": "score", "top_k": k, "targets": "topk", "teacher": {}, "sampling": {}, "logprobs_mode": "raw_logprobs",
              "max_length": 256, "overflow": "truncate", "data": {}, "shard_size": len(samples), "encoding": encoding}
    w = StoreWriter(url, header, overwrite=True)
    shard = Shard.build(samples, k)
    t0 = time.time()
    w.write_shard(0, shard)
    write_s = time.time() - t0
    got = StoreReader(url).read_shard("shards/s000000")
    from kdship.cache.inspect import _store_bytes

    nbytes = _store_bytes(url)
    T = shard.num_positions
    has = shard.topk_ids[:, 0] >= 0
    assert np.array_equal(got.topk_ids, shard.topk_ids)
    kl = kl_topk(shard.topk_logprobs[has], got.topk_logprobs[has])
    return {
        "bytes_per_position": sum(nbytes.values()) / T,
        "ids_B": nbytes.get("topk_ids", 0) / T,
        "logprobs_B": nbytes.get("topk_logprobs", 0) / T,
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "positions": T,
        "write_s": write_s,
    }


HEADTAIL_GRID = ((4, 8), (2, 10), (8, 4), (8, 8), (16, 16))  # (exact head h, residual draws N)


def headtail_encodings() -> dict:
    """The default headtail encoding and the alternatives it was chosen over (one change each)."""
    d = default_encoding("headtail", 49152)
    alt = lambda **kw: {**json.loads(json.dumps(d)), **kw}  # noqa: E731
    return {
        "**default (chosen)**": d,
        "ids without Delta (sorted only)": alt(target_ids=dict(d["target_ids"], filter=None)),
        "logprobs 1/1024 nat": alt(logprobs=dict(d["logprobs"], fixed_scale=1024)),
        "logprobs 1/256 nat": alt(logprobs=dict(d["logprobs"], fixed_scale=256)),
        "zstd 5": alt(clevel=5, compressor="blosc-zstd-5"),
    }


def headtail_measure(teacher: str, n_conv: int, workdir: str) -> list[str]:
    """Headtail stores from exact full-softmax draws (hf): bytes per position per (h, N) and encoding,
    and the rest mass / weight-sum error against the float64 forward."""
    import torch

    from kdship.cache.hf_backend import HFBackend
    from kdship.cache.targets import draw_headtail_targets

    rows = teacher_rows(teacher, n_conv, 1)  # tokens and masks only
    be = HFBackend(teacher)
    V = be.vocab_size()
    per = {hn: [] for hn in HEADTAIL_GRID}
    rest_err = 0.0
    for i, r in enumerate(rows):
        toks = r["tokens"]
        with torch.no_grad():
            lp = torch.log_softmax(be.model(torch.as_tensor([toks.tolist()])).logits[0].double(), -1)
        vals, order = torch.sort(lp[:-1], -1, descending=True)
        ids = np.concatenate([np.full((1, V), -1, np.int32), order.numpy().astype(np.int32)])
        lps = np.concatenate([np.full((1, V), -np.inf), vals.numpy()])
        own = np.concatenate([[np.nan], lp[:-1].gather(1, torch.as_tensor(toks[1:], dtype=torch.long)[:, None])[:, 0].numpy()])
        for (h, n) in HEADTAIL_GRID:
            t = draw_headtail_targets(ids, lps, toks, own, h, n, np.random.default_rng([i, h, n]))
            t.pop("missing_mass")
            per[(h, n)].append(dict(t, tokens=toks, loss_mask=r["loss_mask"], sample_index=i))
            if (h, n) == HEADTAIL_GRID[0]:
                p = lp[:-1].exp().numpy()
                for j in range(1, len(toks)):
                    exact = set(t["target_ids"][j][(t["target_ids"][j] >= 0) & (t["target_counts"][j] == 0)].tolist()) | {int(toks[j])}
                    rest_err = max(rest_err, abs(np.exp(np.float64(t["rest_logmass"][j])) - (1 - p[j - 1][sorted(exact)].sum())))
    lines = ["| h | N | encoding | B/position | ids B | logprobs B | counts B | rest + beyond + data-token B | distinct draws/row | max abs(sum w - 1) |", "|---|---|---|---|---|---|---|---|---|---|"]
    from kdship.cache.inspect import _store_bytes

    for (h, n), samples in per.items():
        encs = headtail_encodings() if (h, n) == HEADTAIL_GRID[0] else {"**default (chosen)**": default_encoding("headtail", V)}
        for ename, enc in encs.items():
            url = os.path.join(workdir, f"ht{h}-{n}-{abs(hash(ename))}")
            header = {"mode": "score", "top_k": h, "targets": "headtail", "target_sampling": {"head": h, "draws": n}, "teacher": {"vocab_size": V},
                      "data": {}, "encoding": enc}
            w = StoreWriter(url, header, overwrite=True)
            w.write_shard(0, Shard.build(samples, h + n, targets="headtail"))
            got = StoreReader(url).read_shard("shards/s000000")
            nb = _store_bytes(url)
            T = got.num_positions
            has = got.has_target()
            werr = float(np.abs(got.target_weights[has].astype(np.float64).sum(1) - 1).max())
            distinct = float(((got.target_ids[has] >= 0) & (got.target_counts[has] > 0)).sum(1).mean())
            lines.append(f"| {h} | {n} | {ename} | {sum(nb.values()) / T:.1f} | {nb['target_ids'] / T:.1f} | {nb['target_logprobs'] / T:.1f} | "
                         f"{nb['target_counts'] / T:.1f} | {(nb['rest_logmass'] + nb['beyond_logmass'] + nb['token_logprob']) / T:.1f} | {distinct:.2f} | {werr:.1e} |")
            print(lines[-1], flush=True)
    lines += ["", f"Rest mass stored (h = {HEADTAIL_GRID[0][0]}, N = {HEADTAIL_GRID[0][1]}) vs the float64 forward: max abs error {rest_err:.1e} over every row (goal <= 1e-3).", ""]
    return lines


def merge_results() -> None:
    """bench/results/cache.md = every cache_*.md section (each script writes its own)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from run_all import combine_area

    combine_area("cache")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--headtail-only", action="store_true", help="only the headtail (format v2 default) section, SmolLM2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache_bytes.md"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kdship-bytes-")
    if not args.skip_smollm:
        from kdship.demo.assets import smollm2_dir

        lines = ["## Headtail store bytes per position (format v2 default; bench/cache_bytes.py)", "",
                 f"Machine: {MACHINE}. Teacher SmolLM2-135M-Instruct (vocabulary 49,152), first {args.conversations} chitchat conversations "
                 "(<= 256 tokens), exact draws from the full softmax. Bytes = all files of the shard's arrays on disk / positions "
                 "(DistillKit's budget layout at k = 50: 114 B).", ""]
        lines += headtail_measure(str(smollm2_dir()), args.conversations, work)
        (ROOT / "bench" / "results" / "cache_bytes_headtail.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        if args.headtail_only:
            merge_results()
            return
    teachers = {}
    from kdship.tiny import build_tiny_llama

    teachers["tiny test teacher (vocab 512)"] = str(build_tiny_llama(Path(work) / "tiny", hidden=128, layers=2, heads=2, kv_heads=1, seed=0))
    if not args.skip_smollm:
        from kdship.demo.assets import smollm2_dir

        teachers["SmolLM2-135M-Instruct (vocab 49152)"] = str(smollm2_dir())
    lines = [
        "## Store bytes per position and encoding error (bench/cache_bytes.py)",
        "",
        f"Machine: {MACHINE}. Text: chitchat-dataset conversations rendered with each teacher's chat template "
        f"(first {args.conversations}, <= 256 tokens each). Bytes = all files of the shard's arrays on disk / positions. "
        "KL = KL(exact top-k || decoded top-k), both renormalised over the k entries, nat. "
        "Anchors: DistillKit ~114 B/token at k=50, ~300 B at k=128; naive int64+fp32 = 12 B x k.",
        "",
    ]
    chosen = default_encoding()
    results = {}
    for tname, tdir in teachers.items():
        t0 = time.time()
        rows = teacher_rows(tdir, args.conversations, max(KS))
        print(f"{tname}: {sum(len(r['tokens']) for r in rows)} positions scored in {time.time() - t0:.0f} s", flush=True)
        lines += [f"### {tname}", "", "| encoding | k | B/position | ids B | logprobs B | KL mean | KL p99 | KL max |", "|---|---|---|---|---|---|---|---|"]
        for k in KS:
            for ename, enc in list(ENCODINGS.items()) + [("**default (chosen)**", chosen)]:
                m = measure(rows, k, enc, work)
                results[(tname, k, ename)] = m
                lines.append(
                    f"| {ename} | {k} | {m['bytes_per_position']:.1f} | {m['ids_B']:.1f} | {m['logprobs_B']:.1f} | "
                    f"{m['kl_mean']:.1e} | {m['kl_p99']:.1e} | {m['kl_max']:.1e} |"
                )
                print(tname, k, ename, {a: round(b, 6) for a, b in m.items()}, flush=True)
        lines.append("")
    lines += ["Chosen default encoding: `" + json.dumps(chosen) + "`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    merge_results()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
