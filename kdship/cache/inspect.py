"""``kdship inspect``: what a store holds, read from the store alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdship.store import HIDDEN_ARRAY_DTYPES, PROJECTION_GROUP, REST_FLOOR, StoreReader, _fs, draw_logprobs_stored

# Below this many positions per shard a reader's fixed per-shard cost (~12 ms of zarr CPU) dominates
# decoding: the trainer's loader then runs at a fraction of its rate (bench/RESULTS.md, train).
SMALL_SHARD_POSITIONS = 16384


def _store_bytes(url: str) -> dict[str, int]:
    """Bytes on disk of the committed shards' arrays, per array name (+ the hint projection's group)."""
    fs, path = _fs(url)
    out: dict[str, int] = {}
    reader = StoreReader(url, verify=False)
    for sp in reader.shard_paths:
        base = f"{path.rstrip('/')}/{sp}"
        for f, info in fs.find(base, detail=True).items():
            rel = f[len(base) + 1 :]
            name = rel.split("/", 1)[0]
            out[name] = out.get(name, 0) + int(info.get("size", 0))
    proj = f"{path.rstrip('/')}/{PROJECTION_GROUP}"
    if reader.hidden_states and fs.exists(proj):  # the hint projection: once per store
        out[PROJECTION_GROUP] = sum(int(i.get("size", 0)) for i in fs.find(proj, detail=True).values())
    return out


def inspect_store(url: str, verify: bool = True) -> dict[str, Any]:
    """Summary of a store (all committed shards read; checksums verified when ``verify``).

    ``mean_topk_mass`` = mean over targeted positions of sum_k exp(topk_logprobs): the share of the
    teacher's probability the stored ids cover (1.0 would be the whole distribution). Headtail stores
    add ``headtail``: the mean exact mass (head + data token, and with ``--certain-exact`` the draws
    certain to be hit) and exact entries per row, the mean rest mass (what the draws
    stand for), distinct draws per row, and the largest |sum of a row's weights - 1| (encoding error).
    """
    r = StoreReader(url, verify=verify)
    h = r.header
    samples = positions = targeted = with_target = 0
    mass_sum = 0.0
    valid_k_sum = 0
    ht = {"exact_mass": 0.0, "rest_mass": 0.0, "beyond_mass": 0.0, "distinct_draws": 0, "exact_entries": 0, "max_weight_sum_error": 0.0}
    for _, shard in r.iter_shards():
        samples += shard.num_samples
        positions += shard.num_positions
        has = shard.has_target()
        if shard.targets == "headtail":
            sel = has & shard.loss_mask
            if sel.any():
                rest = np.exp(shard.rest_logmass[sel].astype(np.float64))
                ht["rest_mass"] += float(rest.sum())
                ht["exact_mass"] += float((1.0 - rest).sum())
                ht["distinct_draws"] += int(((shard.target_ids[sel] >= 0) & (shard.target_counts[sel] > 0)).sum())
                ht["exact_entries"] += int(((shard.target_ids[sel] >= 0) & (shard.target_counts[sel] == 0)).sum())
                bl = shard.beyond_logmass[sel].astype(np.float64)
                beyond = np.where(bl > REST_FLOOR, np.exp(bl), 0.0)  # the trainer's bucket: the weights sum to 1 - B
                ht["beyond_mass"] += float(beyond.sum())
                err = np.abs(shard.target_weights[sel].astype(np.float64).sum(1) + beyond - 1.0).max()
                ht["max_weight_sum_error"] = max(ht["max_weight_sum_error"], float(err))
        with_target += int(has.sum())
        sel = has & shard.loss_mask
        targeted += int(sel.sum())
        if sel.any():
            lp = shard.topk_logprobs[sel].astype(np.float64)
            if shard.teacher_logprob_known is not None:  # no draws' logprobs: the mass of the exact entries
                lp = np.where(shard.teacher_logprob_known[sel], lp, -np.inf)
            mass_sum += float(np.exp(lp).sum(axis=1).sum())
            valid_k_sum += int((shard.topk_ids[sel] >= 0).sum())
    nbytes = _store_bytes(url)
    total = sum(nbytes.values())
    rejects = r.rejects()
    reasons: dict[str, int] = {}
    for rj in rejects:
        key = str(rj.get("reason", "?")).split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    n_total = h.get("num_shards_total")
    headtail = None
    if h.get("targets") == "headtail" and targeted:
        headtail = {
            "head": (h.get("target_sampling") or {}).get("head"),
            "draws": (h.get("target_sampling") or {}).get("draws"),
            "certain_exact": bool((h.get("target_sampling") or {}).get("certain_exact")),
            "draw_logprobs": draw_logprobs_stored(h),
            "mean_exact_mass": round(ht["exact_mass"] / targeted, 4),
            "mean_rest_mass": round(ht["rest_mass"] / targeted, 4),
            "mean_beyond_mass": round(ht["beyond_mass"] / targeted, 4),
            "mean_distinct_draws": round(ht["distinct_draws"] / targeted, 2),
            "mean_exact_entries": round(ht["exact_entries"] / targeted, 2),
            "max_weight_sum_error": float(f"{ht['max_weight_sum_error']:.3g}"),
        }
    return {
        "store": str(url),
        "hidden_states": _hidden_summary(h, nbytes, positions),
        "format_version": h.get("format_version"),
        "mode": h.get("mode"),
        "targets": h.get("targets", "topk"),
        "target_sampling": h.get("target_sampling"),
        "top_k": h.get("top_k"),
        "samples": samples,
        "positions": positions,
        "positions_with_targets": with_target,
        "targeted_positions": targeted,
        "mean_valid_k": round(valid_k_sum / targeted, 2) if targeted else None,
        "mean_topk_mass": round(mass_sum / targeted, 4) if targeted else None,
        "headtail": headtail,
        "bytes_total": total,
        "bytes_per_position": round(total / positions, 2) if positions else None,
        "bytes_per_position_by_array": {k: round(v / positions, 2) for k, v in sorted(nbytes.items())} if positions else {},
        "teacher": h.get("teacher"),
        "sampling": h.get("sampling"),
        "logprobs_mode": h.get("logprobs_mode"),
        "encoding": h.get("encoding"),
        "shards_committed": len(r.shard_paths),
        "mean_positions_per_shard": round(positions / len(r.shard_paths)) if r.shard_paths else None,
        "shards_total": n_total,
        "complete": bool(h.get("complete", False)) or (n_total is not None and len(r.shard_paths) == n_total),
        "checksums_verified": verify,
        "rejects": len(rejects),
        "rejects_by_reason": reasons,
        "kdship_version": h.get("kdship_version"),
    }


def _hidden_summary(header: dict[str, Any], nbytes: dict[str, int], positions: int) -> dict[str, Any] | None:
    """The teacher hidden states a hint-KD store holds: layers, dim, encoding, bytes per position."""
    spec = header.get("hidden_states")
    if not spec:
        return None
    arrays = [n for n in HIDDEN_ARRAY_DTYPES if n in nbytes]
    b = sum(nbytes[n] for n in arrays)
    return {
        "layers": spec["layers"], "dim": spec["dim"], "hidden_size": spec["hidden_size"], "encoding": spec["encoding"]["dtype"],
        "arrays": arrays, "bytes_per_position": round(b / positions, 2) if positions else None,
        "projection_bytes": nbytes.get(PROJECTION_GROUP, 0),
    }


def format_report(info: dict[str, Any]) -> str:
    t = info.get("teacher") or {}
    lines = [
        f"store            {info['store']}  (format v{info['format_version']}, kdship {info['kdship_version']})",
        f"mode / targets   {info['mode']} / {info['targets']}   k={info['top_k']}   logprobs={info['logprobs_mode']}",
        f"samples          {info['samples']}",
        f"positions        {info['positions']} ({info['positions_with_targets']} with targets, {info['targeted_positions']} targeted by loss_mask)",
        f"bytes/position   {info['bytes_per_position']}  {info['bytes_per_position_by_array']}",
        f"top-k mass       {info['mean_topk_mass']} (mean probability inside the stored targets)",
        f"teacher          {t.get('name_or_path')}",
        f"  weights sha256 {t.get('weights_sha256')}",
        f"  vocab {t.get('vocab_size')}  tokenizer sha256 {str(t.get('tokenizer_sha256'))[:16]}...  chat template sha256 {str(t.get('chat_template_sha256'))[:16]}",
        f"shards           {info['shards_committed']}/{info['shards_total']} committed, complete={info['complete']}, checksums verified={info['checksums_verified']}, "
        f"{info.get('mean_positions_per_shard')} positions per shard",
        f"rejects          {info['rejects']} {info['rejects_by_reason'] or ''}",
    ]
    per = info.get("mean_positions_per_shard")
    if per is not None and per < SMALL_SHARD_POSITIONS and info["shards_committed"] > 1:
        lines.append(
            f"note             small shards ({per} positions each): the trainer's loader pays a fixed ~12 ms per shard, "
            f"so it decodes several times slower than with >= {SMALL_SHARD_POSITIONS} (kdship cache --shard-positions, default 65536)"
        )
    if info.get("headtail"):
        ht = info["headtail"]
        lines.insert(
            6,
            f"headtail         exact mass {ht['mean_exact_mass']} (head{', draws certain to be hit' if ht.get('certain_exact') else ''} and data token; "
            f"{ht.get('mean_exact_entries')} stored exact entries per row), rest mass {ht['mean_rest_mass']} "
            f"estimated by {ht['mean_distinct_draws']} distinct of {ht['draws']} draws, {ht['mean_beyond_mass']} of it beyond the "
            f"backend's candidates (never drawn: one bucket); max |sum of weights + beyond - 1| {ht['max_weight_sum_error']}"
            + ("" if ht.get("draw_logprobs", True) else "; the draws' logprobs are not stored (--no-draw-logprobs): trains fkl and CE only"),
        )
    hs = info.get("hidden_states")
    if hs:
        lines.insert(
            5,
            f"hidden states    layers {hs['layers']} projected {hs['hidden_size']} -> {hs['dim']} (PCA), {hs['encoding']}: "
            f"{hs['bytes_per_position']} bytes/position ({' + '.join(hs['arrays'])}), projection {hs['projection_bytes']} bytes",
        )
    if info.get("sampling"):
        lines.insert(2, f"sampling         {info['sampling']}")
    if info.get("target_sampling"):
        lines.insert(2, f"target sampling  {info['target_sampling']}")
    return "\n".join(lines)
