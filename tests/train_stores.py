"""Test helper: a real Zarr teacher store written from a plain transformers forward of a teacher.

Used by the train tests (independent of `kdship cache`): the same layout and header the cache writes,
through the store's own ``StoreWriter`` / ``Shard.build``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_teacher_store(
    teacher: str | Path, out: str | Path, texts: list[str], top_k: int = 16, shard_size: int = 40, sampled_draws: int | None = None, seed: int = 0,
    exact_logprobs: bool = False,
) -> Path:
    """Score ``texts`` with the teacher (T = 1 log-softmax) and write a text-mode store.

    ``sampled_draws``: write a ``targets: sampled`` store instead (N draws per position, distinct ids,
    weights count/N), drawn from the full softmax like the cache's hf backend.
    ``exact_logprobs``: store the logprobs as plain float32 (no lossy BitRound filter).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdship.fingerprint import teacher_fingerprint
    from kdship.store import Shard, StoreWriter

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    samples = []
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [L, V]
        L = len(ids)
        K = top_k
        out_ids = np.full((L, K), -1, np.int32)
        out_lp = np.full((L, K), -np.inf, np.float32)
        weights = np.zeros((L, K), np.float32)
        if sampled_draws:
            probs = lp.exp().double().numpy()
            for j in range(1, L):
                p = probs[j - 1] / probs[j - 1].sum()
                draws = rng.choice(len(p), size=sampled_draws, p=p)
                uniq, counts = np.unique(draws, return_counts=True)
                order = np.argsort(-counts, kind="stable")[:K]
                n = len(order)
                out_ids[j, :n] = uniq[order]
                out_lp[j, :n] = lp[j - 1, uniq[order]].numpy()
                weights[j, :n] = counts[order] / sampled_draws
        else:
            v, ix = lp[:-1].topk(K, -1)
            out_ids[1:] = ix.numpy()
            out_lp[1:] = v.numpy()
        s = {"tokens": np.asarray(ids, np.int32), "loss_mask": np.ones(L, bool), "topk_ids": out_ids, "topk_logprobs": out_lp, "sample_index": i}
        if sampled_draws:
            s["target_weights"] = weights
        samples.append(s)
    header = {
        "mode": "score",
        "top_k": top_k,
        "targets": "sampled" if sampled_draws else "topk",
        "teacher": teacher_fingerprint(str(teacher), tok),
        "sampling": None,
        "logprobs_mode": "raw_logprobs",
        "max_length": 512,
        "overflow": "error",
        "data": {"path": "in-memory test texts", "rows": len(texts)},
        "shard_size": shard_size,
    }
    if exact_logprobs:
        header["encoding"] = {"compressor": "blosc-zstd-bitshuffle-5"}
    w = StoreWriter(str(out), header, overwrite=True)
    for si, a in enumerate(range(0, len(samples), shard_size)):
        w.write_shard(si, Shard.build(samples[a : a + shard_size], top_k, with_target_weights=bool(sampled_draws)))
    w.update_header(complete=True)
    return Path(out)
