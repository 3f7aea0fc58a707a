"""On-policy rounds: the student learns on its own generations, scored offline by the teacher.

``kdship train STORE ... --max-steps S --on-policy-rounds R --prompts P --teacher T`` splits the S
steps into R + 1 phases (phase r ends at step S * (r + 1) // (R + 1)). Without --max-steps, S is the
number of batches --epochs E (default 1) passes over STORE give, as plain training counts them;
without --teacher, T is the teacher STORE's header records. Phase 0 trains on STORE only.
After each phase r < R:

1. generate: the student, as the checkpoint at the phase's last step holds it, samples
   ``--samples-per-prompt`` responses per prompt of P (transformers, seeded per run seed, round and
   prompt; ``kdship.train.generate``) -> ``RUN/rounds/r/generations.jsonl`` (written atomically);
2. score: ``python -m kdship cache T generations.jsonl --mode score`` in a subprocess writes
   ``RUN/rounds/r/store`` with STORE's target kind and k. The teacher lives only in that process, so
   it is released before training resumes and the trainer never holds it. The round store must have
   STORE's teacher identity (weights, vocabulary, tokenizer, chat template) or the run stops;
3. train: the next phase draws each batch from the round stores so far (all of them, equally) with
   probability ``--on-policy-fraction`` and from STORE otherwise (``kdship.train.loader.MixedLoader``).

``--mix-teacher a`` samples each token from a * p_teacher + (1 - a) * p_student (MiniLLM): the
teacher is then loaded (transformers) in the generate phase only, and released before scoring.

Resuming (``--resume``): ``RUN/rounds/state.json`` records each phase's finished parts (trained,
generated, scored); a killed run redoes only the unfinished part: training resumes from the last
checkpoint, a generation file is either complete or absent, and ``kdship cache`` resumes its store.
``RUN/rounds/summary.json``: per round the seconds of generate / score / train and their shares,
generated tokens, scored positions, trained tokens and batches per store.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kdship.store import headtail_draw_flags
from kdship.train.trainer import DEFAULTS, TrainError, _ckpt_dirs, _Dist, _resolve_settings, _Run, load_student, load_weights, train

log = logging.getLogger("kdship.train.onpolicy")

STATE_FILE = "state.json"


def phase_ends(max_steps: int, rounds: int) -> list[int]:
    """The step at which each of the R + 1 phases ends."""
    return [max_steps * (r + 1) // (rounds + 1) for r in range(rounds + 1)]


def count_store_batches(store: str, cfg: dict[str, Any]) -> int:
    """The batches ``cfg["epochs"]`` passes over STORE give under ``cfg``: counted by the trainer's own
    loader, as a plain ``kdship train --epochs`` run counts its steps."""
    loader = _Run(cfg=cfg, store=str(store), out_dir=Path(), dist=_Dist(False)).make_loader(max_epochs=int(cfg["epochs"]))
    try:
        return loader.count_batches()
    finally:
        loader.close()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _score_backend(header: dict[str, Any]) -> str:
    """The backend the original store was scored with, as its header tells (vLLM when it does not)."""
    ts = header.get("target_sampling") or {}
    return "hf" if ts.get("exact") else "vllm"


def _score_command(teacher: str, gens: Path, store: Path, header: dict[str, Any], backend: str, seed: int) -> list[str]:
    """`kdship cache ... --mode score` with the original store's target kind, k and length limit."""
    cmd = [sys.executable, "-m", "kdship", "cache", teacher, str(gens), "--out", str(store), "--mode", "score", "--backend", backend,
           "--targets", str(header["targets"]), "--top-k", str(header["top_k"]), "--max-length", str(header["max_length"]),
           "--overflow", "truncate", "--seed", str(seed), "--no-progress"]
    ts = header.get("target_sampling") or {}
    # the round store is drawn as the original was (the trainer's checks, e.g. fkl only without draw logprobs, hold for both)
    cmd += headtail_draw_flags(header)
    if backend == "vllm" and isinstance(ts.get("candidates"), int):
        cmd += ["--sampled-candidates", str(ts["candidates"])]
    return cmd


def score_round(teacher: str, gens: Path, store: Path, header: dict[str, Any], main_store: str, backend: str, seed: int) -> dict[str, Any]:
    """Score a round's generations with the teacher in its own process; check the round store."""
    from kdship.store import StoreReader
    from kdship.train.trainer import check_same_teacher

    import kdship

    env = dict(os.environ)
    root = str(Path(kdship.__file__).resolve().parents[1])  # the child runs this kdship
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = _score_command(teacher, gens, store, header, backend, seed)
    log.info("on-policy score: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise TrainError(f"scoring {gens} with the teacher failed (exit {proc.returncode}): {' '.join(cmd)}")
    reader = StoreReader(str(store), verify=False)
    if not reader.complete:
        raise TrainError(f"{store}: the round store is not complete after scoring")
    check_same_teacher(header, reader.header, main_store, str(store))
    return {"scored_samples": reader.num_samples(), "scored_positions": reader.num_positions()}


def _generate_round(cfg: dict[str, Any], out: Path, r: int, end_step: int, op: dict[str, Any]) -> dict[str, Any]:
    """The student at the end of phase r (its checkpoint) writes round r's generations."""
    import torch
    from safetensors.torch import load_file

    ckpts = _ckpt_dirs(out)
    if not ckpts or int(ckpts[-1].name.split("_")[1]) != end_step:
        raise TrainError(f"{out}: no checkpoint at step {end_step} (the end of phase {r}) to generate from")
    model, tok, _ = load_student(cfg["student"], cfg["init_from_config"], cfg["layers"], cfg["hidden"], int(cfg["seed"]))
    load_weights(model, load_file(str(ckpts[-1] / "model.safetensors")), ckpts[-1])
    teacher = None
    if op["mix_teacher"]:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(op["teacher"], dtype=torch.float32).eval()
    from kdship.train.generate import generate_responses

    try:
        return generate_responses(model, tok, op["prompts"], out / "rounds" / str(r) / "generations.jsonl", r, int(cfg["seed"]),
                                  int(op["samples_per_prompt"]), int(op["max_new_tokens"]), teacher, float(op["mix_teacher"]))
    finally:
        del model, teacher  # both released before the scorer and the next phase start
        gc.collect()


def _open_state(out: Path, settings: dict[str, Any], rounds: int, resume: bool, overwrite: bool) -> dict[str, Any]:
    rdir = out / "rounds"
    path = rdir / STATE_FILE
    if path.is_file() and resume:
        state = json.loads(path.read_text())
        if state["settings"] != settings:
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise TrainError(f"--resume {out}: the on-policy run was started with different {', '.join(changed)}; resume with the same settings")
        return state
    if rdir.exists() and not resume:
        if not overwrite:
            raise TrainError(f"{out} holds an earlier on-policy run (rounds/); pass --resume to continue it, --overwrite to replace it, or another --out")
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    state = {"settings": settings, "phases": [{"round": r, "trained": False, "generated": r == rounds, "scored": r == rounds, "seconds": {}}
                                              for r in range(rounds + 1)]}
    _write_json(path, state)
    return state


def _train_phase(store, student, out: Path, config, options, r: int, end_step: int, last: bool, resume: bool, fraction: float) -> dict[str, Any]:
    """Phase r's steps: from the last checkpoint up to end_step, on STORE plus rounds 0..r-1."""
    done = int(_ckpt_dirs(out)[-1].name.split("_")[1]) if resume and _ckpt_dirs(out) else 0
    mix = [str(out / "rounds" / str(i) / "store") for i in range(r)]
    opts = {**options, "resume": resume, "mix_stores": mix or None, "mix_fraction": fraction if mix else 0.0}
    if not last:
        if done >= end_step:  # killed after the phase's checkpoint landed, before the state said so
            return {"steps": done, "tokens": None}
        opts["stop_after"] = end_step - done
    return train(store, student=student, out=str(out), config=config, **opts)


def train_on_policy(store: str, student: str | None, out: str, config: str | None, rounds: int, prompts: str, teacher: str,
                    fraction: float = 0.5, samples_per_prompt: int = 1, max_new_tokens: int = 128, mix_teacher: float = 0.0,
                    score_backend: str | None = None, **options: Any) -> dict[str, Any]:
    """Train with R on-policy rounds (module docstring); returns the last phase's train summary plus
    ``rounds``, the per-round summary (also RUN/rounds/summary.json)."""
    from kdship.store import StoreReader

    header = StoreReader(store, verify=False).header
    cfg, teacher = _check_options(store, header, student, config, options, rounds, prompts, teacher, fraction, samples_per_prompt, max_new_tokens, mix_teacher)
    # every phase trains on the resolved settings, max_steps included (derived from --epochs when not
    # given), as flags: an `epochs` in --config would otherwise come back beside it
    student, config = cfg["student"], None
    options = {k: cfg[k] for k in DEFAULTS if k not in ("student", "epochs")}
    backend = score_backend or _score_backend(header)
    out_dir = Path(out)
    op = {"rounds": rounds, "prompts": str(prompts), "teacher": str(teacher), "fraction": fraction, "samples_per_prompt": samples_per_prompt,
          "max_new_tokens": max_new_tokens, "mix_teacher": mix_teacher, "score_backend": backend, "store": str(store),
          "max_steps": int(cfg["max_steps"]), "seed": int(cfg["seed"])}
    state = _open_state(out_dir, op, rounds, bool(cfg["resume"]), bool(cfg["overwrite"]))
    state_path = out_dir / "rounds" / STATE_FILE
    ends = phase_ends(int(cfg["max_steps"]), rounds)
    resume = bool(cfg["resume"])
    options = {k: v for k, v in options.items() if k not in ("resume",)}
    last_summary: dict[str, Any] = {}
    for r, phase in enumerate(state["phases"]):
        if not phase["trained"]:
            t0 = time.perf_counter()
            s = _train_phase(store, student, out_dir, config, options, r, ends[r], r == rounds, resume, fraction)
            phase.update(trained=True)
            phase["seconds"]["train"] = time.perf_counter() - t0
            _write_json(state_path, state)
            last_summary = s
        resume, options["overwrite"] = True, False  # later phases continue this run
        if not phase["generated"]:
            t0 = time.perf_counter()
            phase["generation"] = _generate_round(cfg, out_dir, r, ends[r], op)
            phase.update(generated=True)
            phase["seconds"]["generate"] = time.perf_counter() - t0
            _write_json(state_path, state)
        if not phase["scored"]:
            t0 = time.perf_counter()
            rdir = out_dir / "rounds" / str(r)
            phase["score"] = score_round(str(teacher), rdir / "generations.jsonl", rdir / "store", header, str(store), backend, int(cfg["seed"]) + r)
            phase.update(scored=True)
            phase["seconds"]["score"] = time.perf_counter() - t0
            _write_json(state_path, state)
    summary = _round_summary(state, out_dir, ends)
    _write_json(out_dir / "rounds" / "summary.json", summary)
    for rec in summary["rounds"]:
        log.info("on-policy round %d: %s", rec["round"], json.dumps(rec, default=str))
    if not last_summary:  # everything was already done: the final phase's summary on disk
        last_summary = json.loads((out_dir / "summary.json").read_text())
    return {**last_summary, "rounds": summary}


def _check_options(store, header, student, config, options, rounds, prompts, teacher, fraction, samples_per_prompt, max_new_tokens, mix_teacher):
    """The resolved settings (``max_steps`` set, from --epochs when not given) and the teacher directory."""
    cfg = _resolve_settings(store, student, config, options)  # refuses --max-steps with --epochs, as plain training does
    if rounds < 1:
        raise TrainError(f"--on-policy-rounds must be >= 1, got {rounds}")
    if cfg["max_steps"] is not None and int(cfg["max_steps"]) < rounds + 1:
        raise TrainError(f"--on-policy-rounds {rounds} needs --max-steps of at least {rounds + 1} (one phase per round, plus the first)")
    if cfg["stop_after"] is not None or cfg["mix_stores"] or cfg["online_teacher"] or cfg["fsdp"]:
        raise TrainError("--on-policy-rounds does not combine with --stop-after, --online-teacher or --fsdp")
    if not prompts or not Path(prompts).is_file():
        raise TrainError(f"--prompts {prompts}: no such file (JSONL of {{prompt}} or {{messages}} rows)")
    if not teacher:
        recorded = (header.get("teacher") or {}).get("name_or_path")
        if not recorded or not Path(recorded).is_dir():
            raise TrainError(f"--teacher is required for --on-policy-rounds: the store records teacher {recorded}, which is not a directory here")
        teacher = recorded
        log.info("on-policy: no --teacher given; scoring with the teacher %s records: %s", store, teacher)
    elif not Path(teacher).is_dir():
        raise TrainError(f"--teacher {teacher}: not a directory (the store's teacher, to score the rounds)")
    if not 0.0 <= fraction <= 1.0 or not 0.0 <= mix_teacher <= 1.0:
        raise TrainError(f"--on-policy-fraction ({fraction}) and --mix-teacher ({mix_teacher}) must be in [0, 1]")
    if samples_per_prompt < 1 or max_new_tokens < 1:
        raise TrainError("--samples-per-prompt and --on-policy-max-new-tokens must be >= 1")
    if cfg["max_steps"] is None:  # last: counting reads every shard's offsets
        steps = count_store_batches(store, cfg)
        if steps < rounds + 1:
            raise TrainError(f"--on-policy-rounds {rounds} needs at least {rounds + 1} steps (one phase per round, plus the first); "
                             f"--epochs {cfg['epochs']} over {store} gives {steps}: raise --epochs or give --max-steps")
        log.info("on-policy: --epochs %s over %s gives %d steps, split into %d phases", cfg["epochs"], store, steps, rounds + 1)
        cfg["max_steps"], cfg["epochs"] = steps, None
    return cfg, teacher


def _round_summary(state: dict[str, Any], out: Path, ends: list[int]) -> dict[str, Any]:
    """Per round: seconds of each part and their shares, tokens generated / scored / trained, and the
    batches each store gave (from metrics.jsonl, which a resumed run truncates to its checkpoint)."""
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [rec for rec in steps if "loss" in rec]
    tokens_at = {rec["step"]: rec["tokens"] for rec in steps}
    rounds = []
    for p, end, start in zip(state["phases"], ends, [0] + ends[:-1]):
        sec = {k: round(v, 3) for k, v in p["seconds"].items()}
        total = sum(sec.values())
        by_source: dict[str, int] = {}
        for rec in steps:
            if start < rec["step"] <= end:
                by_source[rec.get("source", "main")] = by_source.get(rec.get("source", "main"), 0) + 1
        rounds.append({
            "round": p["round"], "steps": [start, end], "seconds": sec,
            "shares": {k: round(v / total, 3) for k, v in sec.items()} if total else {},
            "train_tokens": tokens_at.get(end, 0) - tokens_at.get(start, 0),
            "batches_by_source": by_source,
            "generated_tokens": (p.get("generation") or {}).get("generated_tokens"),
            "responses": (p.get("generation") or {}).get("responses"),
            "scored_positions": (p.get("score") or {}).get("scored_positions"),
        })
    return {"settings": state["settings"], "rounds": rounds}
