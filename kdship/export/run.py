"""``kdship export``: a trained student (or any HF causal LM folder) -> deployable formats + a report.

Layout written under ``out``::

    OUT/hf/                      safetensors + config + tokenizer + generation_config (transformers, vLLM)
    OUT/onnx/model.onnx          fp32 decoder with KV-cache inputs/outputs (prefill + decode, one graph)
    OUT/onnx/model.int8.onnx     --quantize int8: dynamic int8 MatMul weights
    OUT/onnx/kdship_onnx.json    shapes, names, dtype, special token ids (kdship.runtime.onnx)
    OUT/onnx/tokenizer*.json ... tokenizer files, so the folder alone serves
    OUT/export_report.json       verification: logit diffs, greedy agreement, int8 drift, KL to teacher
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from kdship.export.onnx import ExportError, export_onnx, quantize_int8
from kdship.export.hf import export_hf, resolve_model_dir
from kdship.export.verify import VerificationError
from kdship.heldout import DEFAULT_HELDOUT_FRACTION
from kdship.run_manifest import read_manifest

log = logging.getLogger(__name__)

FORMATS = ("hf", "onnx")
QUANTIZE = ("int8",)
REPORT_FILE = "export_report.json"


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f and f.strip()]
    if not items:
        raise ExportError("--format: empty; choose from " + ", ".join(FORMATS))
    bad = [f for f in items if f not in FORMATS]
    if bad:
        raise ExportError(f"--format {','.join(bad)}: unknown format; choose from {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def export(
    model_dir: str | Path,
    out: str | Path,
    formats: str | Sequence[str] = ("hf", "onnx"),
    quantize: str | None = None,
    verify: bool = True,
    store: str | None = None,
    prompts: int = 8,
    new_tokens: int = 16,
    atol: float = 1e-3,
    kl_positions: int = 2048,
    heldout_fraction: float | None = None,
    vllm: bool = True,
    strict: bool = True,
    show: bool = False,
) -> dict[str, Any]:
    """Export ``model_dir`` (a run folder or an HF folder) to ``out``; verify; return the report.

    ``strict``: raise ``VerificationError`` (after writing the report) when the fp32 ONNX export or
    the HF re-save misses the bounds (``atol`` on logits, identical greedy tokens).
    ``vllm``: include the vLLM load/greedy/KL check of the HF export (one engine start).
    ``store`` / ``heldout_fraction``: None takes them from the run's manifest (``kdship.run_manifest``)
    when ``model_dir`` is a `kdship train` run whose store still exists, so the KL to the teacher is
    measured on the samples the trainer held out.
    """
    fmts = parse_formats(formats)
    quantize = _check_quantize(quantize, fmts)
    store, heldout_fraction = _verify_store(model_dir, store, heldout_fraction, verify)
    src = resolve_model_dir(model_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    report: dict[str, Any] = {
        "source": str(Path(model_dir)),
        "model_dir": str(src),
        "out": str(out),
        "formats": list(fmts),
        "quantize": quantize,
        "files": {},
        "seconds": {},
    }
    from kdship.export.onnx import load_for_export

    model = load_for_export(src)
    report["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    if "hf" in fmts:
        t = time.perf_counter()
        report["files"]["hf"] = export_hf(src, out / "hf", model=model)
        report["seconds"]["hf"] = round(time.perf_counter() - t, 2)
    if "onnx" in fmts:
        t = time.perf_counter()
        _export_onnx_dir(model, src, out, quantize, str(Path(model_dir)), report)
        report["seconds"]["onnx"] = round(time.perf_counter() - t, 2)
    if verify:
        t = time.perf_counter()
        report["verify"] = run_verify(
            model, src, out, fmts, quantize, store, prompts, new_tokens, atol, kl_positions, heldout_fraction, vllm
        )
        report["seconds"]["verify"] = round(time.perf_counter() - t, 2)
    report["seconds"]["total"] = round(time.perf_counter() - t_all, 2)
    report["passed"] = _passed(report)
    (out / (REPORT_FILE + ".tmp")).write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    (out / (REPORT_FILE + ".tmp")).replace(out / REPORT_FILE)
    if show:
        print_report(report)
    if strict and verify and not report["passed"]:
        raise VerificationError(f"{out / REPORT_FILE}: the export does not reproduce {src} within the bounds; see 'verify' there")
    return report


def _check_quantize(quantize: str | None, fmts: tuple[str, ...]) -> str | None:
    if quantize is not None and str(quantize).lower() in ("", "none", "no"):
        return None
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"--quantize {quantize}: unknown; choose from {', '.join(QUANTIZE)}")
    if quantize and "onnx" not in fmts:
        raise ExportError("--quantize int8 quantises the ONNX export: add onnx to --format")
    return quantize


def _verify_store(model_dir, store: str | None, heldout_fraction: float | None, verify: bool) -> tuple[str | None, float]:
    """The store and held-out rule the KL check uses: given, else the run manifest's (when the store
    still exists), so the KL is measured on the samples the trainer held out."""
    from kdship.store import store_exists

    manifest = read_manifest(model_dir)
    if heldout_fraction is None:
        heldout_fraction = manifest.heldout_fraction if manifest else DEFAULT_HELDOUT_FRACTION
    if store is None and verify and manifest is not None:
        if store_exists(manifest.store):
            store = manifest.store
        else:
            log.warning("the run's store %s is gone: no KL to the teacher (pass --store)", manifest.store)
    if store is not None and not verify:
        raise ExportError("--store is used by --verify (KL to the teacher); drop --no-verify or --store")
    if store is not None and not store_exists(str(store)):
        raise ExportError(f"--store {store}: no kdship store there")
    return store, heldout_fraction


def _export_onnx_dir(model, src: Path, out: Path, quantize: str | None, source: str, report: dict[str, Any]) -> None:
    """ONNX (and its int8 copy) written into ``out/onnx.tmp`` and moved to ``out/onnx`` when complete."""
    import shutil

    tmp, onnx_dir = out / "onnx.tmp", out / "onnx"
    if tmp.exists():
        shutil.rmtree(tmp)
    meta = export_onnx(src, tmp, model=model, source=source)
    if quantize == "int8":
        report["int8"] = quantize_int8(tmp)
    _replace_dir(tmp, onnx_dir)
    report["files"]["onnx"] = {"dir": str(onnx_dir), "files": sorted(p.name for p in onnx_dir.iterdir()), "exporter": meta["exporter"]}

def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _replace_dir(tmp: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        dst.replace(old)
        tmp.replace(dst)
        shutil.rmtree(old)
    else:
        tmp.replace(dst)


def _passed(report: dict[str, Any]) -> bool:
    v = report.get("verify")
    if not v:
        return True
    checks = [v[k]["passed"] for k in ("onnx", "hf") if k in v and "passed" in v[k]]
    return all(checks)


def run_verify(model, src, out, fmts, quantize, store, n_prompts, new_tokens, atol, kl_positions, heldout_fraction, use_vllm) -> dict[str, Any]:
    from kdship.export import verify as V
    from kdship.runtime.onnx import OnnxCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    prompts = V.fixed_prompts(tok, n_prompts)
    refs = V.torch_reference(model, prompts, new_tokens)
    res: dict[str, Any] = {"prompts": len(prompts), "new_tokens": new_tokens, "prompt_lengths": [len(p) for p in prompts]}
    lms: dict[str, Any] = {}
    if "onnx" in fmts:
        lms["onnx"] = OnnxCausalLM(out / "onnx")
        res["onnx"] = V.compare_onnx(lms["onnx"], prompts, refs, atol)
        res["onnx"]["providers"] = lms["onnx"].providers
        if quantize == "int8":
            lms["onnx_int8"] = OnnxCausalLM(out / "onnx", int8=True)
            res["onnx_int8"] = V.compare_onnx(lms["onnx_int8"], prompts, refs, None)
    llm = None
    if "hf" in fmts:
        res["hf"] = V.compare_hf_reload(out / "hf", prompts, refs)
        if use_vllm:
            try:
                llm, max_lp = V.vllm_engine(out / "hf", model.config.vocab_size)
                res["vllm"] = V.compare_vllm(llm, prompts, refs)
                res["vllm"]["max_logprobs"] = max_lp
            except Exception as e:  # noqa: BLE001 - reported, not fatal: vLLM may not run this model here
                log.warning("vLLM check skipped: %s", e)
                res["vllm"] = {"skipped": f"{type(e).__name__}: {e}"}
                llm = None
    if store is not None:
        samples = V.heldout_rows(str(store), kl_positions, int(getattr(model.config, "max_position_embeddings", 4096) or 4096), heldout_fraction)
        kl: dict[str, Any] = {
            "store": str(store),
            "samples": len(samples),
            "positions": int(sum(len(s["rows"]) for s in samples)),
            "heldout_rule": "last sample (no sample matched the held-out hash rule)" if samples and samples[0].get("fallback") else f"kdship.heldout.heldout_mask(fraction={heldout_fraction})",
            "definition": "mean forward KL(teacher || model) over the stored top-k ids + one rest bucket, nats",
        }
        if samples:
            kl["pytorch"] = V.kl_from_logprob_fn(samples, V.torch_logprobs_fn(model))
            for name, lm in lms.items():
                kl[name] = V.kl_from_logprob_fn(samples, V.onnx_logprobs_fn(lm))
            if llm is not None and res["vllm"].get("max_logprobs") == -1:
                kl["vllm"] = V.vllm_kl(llm, samples, model.config.vocab_size)
            elif "hf" in fmts and use_vllm:
                kl["vllm"] = None
                kl["vllm_note"] = "vLLM not run or vocabulary > 65536 (full-vocabulary prompt logprobs skipped)"
        res["kl_to_teacher"] = kl
    return res


def print_report(report: dict[str, Any]) -> None:
    """A table of the verification numbers (rich)."""
    from rich.console import Console
    from rich.table import Table

    v = report.get("verify") or {}
    con = Console()
    tab = Table(title=f"kdship export -> {report['out']}")
    for col in ("format", "max |logit diff|", "greedy identical", "top-1 agreement", "KL to teacher", "status"):
        tab.add_column(col)
    kl = v.get("kl_to_teacher", {})

    def f(x, fmt="{:.2e}"):
        return "-" if x is None else fmt.format(x)

    tab.add_row("pytorch", "0", "-", "-", f(kl.get("pytorch"), "{:.5f}"), "reference")
    for name, label in (("onnx", "onnx fp32"), ("onnx_int8", "onnx int8"), ("hf", "hf reload"), ("vllm", "vllm")):
        if name not in v:
            continue
        r = v[name]
        if "skipped" in r:
            tab.add_row(label, "-", "-", "-", "-", "skipped: " + r["skipped"][:60])
            continue
        diff = r.get("max_abs_logit_diff", r.get("max_abs_logprob_diff"))
        greedy = f"{r['greedy_identical']}/{r['greedy_prompts']}" if "greedy_identical" in r else "-"
        top1 = f(r.get("top1_agreement"), "{:.1%}")
        status = "ok" if r.get("passed", True) else "FAIL"
        if name == "onnx_int8":
            status = "drift (reported)"
        if name == "vllm":
            status = "logprob diff"
        tab.add_row(label, f(diff), greedy, top1, f(kl.get(name), "{:.5f}"), status)
    con.print(tab)
    if kl:
        con.print(f"KL on {kl.get('positions')} held-out positions of {kl.get('samples')} samples from {kl.get('store')}")
    con.print(f"report: {Path(report['out']) / REPORT_FILE}  passed: {report.get('passed')}")
