"""Bytes per position and reconstruction error of the hint-KD hidden-state encodings (cache/FORMAT.md).

SmolLM2-135M-Instruct (hidden 576, 30 blocks) over Shakespeare passages: a PCA projection is fitted
(kdship.cache.hidden.fit_projection) on the first passages, then the hidden states of later passages
are projected and stored both ways, through the store's own array writer:

* int8 codes with a per-(row, layer) float16 scale = max |value| / 127 (kdship's choice)
* float16 values

Reported per D: bytes per position per layer (blosc zstd, on disk), the relative RMS error of the
decoded values against the float32 projection, the largest error relative to the row's largest
|value|, and the share of the variance the D components keep.

    python bench/cache_hint_bytes.py [--fit-positions 4096] [--eval-positions 2048]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

LAYERS = [10, 20]
DIMS = [64, 144, 576]


def _states(model_dir: str, texts: list[str], positions: int, layers: list[int]) -> np.ndarray:
    from transformers import AutoTokenizer

    from kdship.cache.hf_backend import HFBackend

    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs, n = [], 0
    for t in texts:
        ids = tok(t)["input_ids"]
        seqs.append(ids)
        n += len(ids)
        if n >= positions:
            break
    be = HFBackend(model_dir, device="cpu")
    return np.concatenate(be.hidden_states(seqs, layers, max_tokens=2048))


def _disk_bytes(arrays: dict[str, np.ndarray]) -> int:
    import zarr

    from kdship.store import _compressor, _write_array
    from kdship.cache.hidden import HIDDEN_CLEVEL

    with tempfile.TemporaryDirectory() as d:
        g = zarr.open_group(d, mode="w", zarr_format=3)
        for name, a in arrays.items():
            _write_array(g, name, a, compressors=[_compressor(HIDDEN_CLEVEL)])
        return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file() and f.name != "zarr.json")


def measure(fit: np.ndarray, held: np.ndarray, dim: int) -> dict:
    from kdship.cache.hidden import fit_projection
    from kdship.store import dequantize_hidden, quantize_hidden

    proj = fit_projection([fit], LAYERS, dim)
    y = proj.project(held)  # [N, L, D] float32
    codes, scales = quantize_hidden(y)
    out = {"dim": dim, "positions": len(y)}
    centred = held - proj.mean[None]
    out["variance_kept"] = round(float((y.astype(np.float64) ** 2).sum() / (centred.astype(np.float64) ** 2).sum()), 4)
    for name, decoded, arrays in (
        ("int8+f16 scale", dequantize_hidden(codes, scales), {"codes": codes, "scales": scales}),
        ("fp16", y.astype(np.float16).astype(np.float32), {"values": y.astype(np.float16)}),
    ):
        err = decoded - y
        rel_rms = float(np.sqrt((err.astype(np.float64) ** 2).sum() / (y.astype(np.float64) ** 2).sum()))
        rel_max = float((np.abs(err).max(-1) / np.maximum(np.abs(y).max(-1), 1e-12)).max())
        b = _disk_bytes(arrays)
        out[name] = {"bytes_per_position_per_layer": round(b / len(y) / len(LAYERS), 2), "raw_bytes": round(sum(a.nbytes for a in arrays.values()) / len(y) / len(LAYERS), 2),
                     "rel_rms_error": float(f"{rel_rms:.3g}"), "max_error_over_row_max": float(f"{rel_max:.3g}")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit-positions", type=int, default=4096)
    ap.add_argument("--eval-positions", type=int, default=2048)
    args = ap.parse_args()
    from kdship.demo.assets import shakespeare_passages, smollm2_dir

    texts = [p["text"] for p in shakespeare_passages()]
    model = str(smollm2_dir())
    fit = _states(model, texts, args.fit_positions, LAYERS)
    held = _states(model, texts[::-1], args.eval_positions, LAYERS)  # other passages than the fit's
    rows = [measure(fit, held, d) for d in DIMS]
    print(json.dumps({"teacher": "SmolLM2-135M-Instruct", "layers": LAYERS, "fit_positions": len(fit), "rows": rows}, indent=1))
    write_md(rows, len(fit), len(held))


def write_md(rows: list[dict], n_fit: int, n_held: int) -> None:
    """bench/results/cache_hint.md, merged into cache.md and RESULTS.md."""
    import sys

    bench = Path(__file__).resolve().parent
    sys.path.insert(0, str(bench))
    from run_all import combine_area, machine_with_load

    lines = ["## Hint KD: hidden-state bytes and error (bench/cache_hint_bytes.py)", "",
             f"Machine: {machine_with_load()}.",
             f"SmolLM2-135M-Instruct hidden states at layers {LAYERS} (hidden 576), PCA fitted on {n_fit} positions of Shakespeare "
             f"passages, measured on {n_held} positions of other passages; bytes on disk per position per layer (blosc zstd).", "",
             "| D | variance kept | int8 + fp16 scale: bytes | rel. RMS error | max error / row max | fp16: bytes | rel. RMS error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        i, f = r["int8+f16 scale"], r["fp16"]
        lines.append(f"| {r['dim']} | {r['variance_kept']} | {i['bytes_per_position_per_layer']} | {i['rel_rms_error']:.2g} | "
                     f"{i['max_error_over_row_max']:.2g} | {f['bytes_per_position_per_layer']} | {f['rel_rms_error']:.2g} |")
    (bench / "results" / "cache_hint.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    combine_area("cache")


if __name__ == "__main__":
    main()
