"""On-policy rounds (`kdship train --on-policy-rounds`): the tiny teacher scores the tiny student's own
generations in a `kdship cache --mode score` subprocess (the real vLLM engine), and training mixes the
round stores in. The trainer runs as a subprocess under a Python audit hook that logs every file it
opens inside the teacher's directory, so "the trainer never loaded the teacher" is an observation that
the --mix-teacher run (which does load it) shows can fail.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdship.train.generate import mixed_probs, sample_mixed
from kdship.train.onpolicy import phase_ends

ROOT = Path(__file__).resolve().parents[1]

# runs `python -m kdship ...` with an audit hook logging this process's opens under $WATCH_DIR
# (the scoring subprocess is a new interpreter: the hook does not follow it there)
HOOKED_KDSHIP = """
import os, runpy, sys
watch, log = os.path.realpath(os.environ["WATCH_DIR"]) + os.sep, os.environ["OPEN_LOG"]
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        p = os.path.realpath(os.fsdecode(args[0]))
        if p.startswith(watch):
            with open(log, "a") as fh:
                fh.write(p + "\\n")
sys.addaudithook(hook)
sys.argv = ["kdship"] + sys.argv[1:]
runpy.run_module("kdship", run_name="__main__", alter_sys=True)
"""


def _env(watch: Path, log: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WATCH_DIR": str(watch), "OPEN_LOG": str(log)}


def _train_args(store, student, teacher, prompts, out, *extra) -> list[str]:
    return [
        sys.executable, "-c", HOOKED_KDSHIP, "train", str(store), "--student", str(student), "--out", str(out), "--max-steps", "9",
        "--batch-tokens", "128", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "0", "--ckpt-every", "0", "--heldout-fraction", "0.1",
        "--eval-samples", "4", "--loss", "rkl", "--no-progress", "--on-policy-rounds", "2", "--prompts", str(prompts), "--teacher", str(teacher),
        "--samples-per-prompt", "2", "--on-policy-max-new-tokens", "12", "--on-policy-fraction", "0.5", "--score-backend", "vllm", *extra,
    ]


def _opened(log: Path) -> list[str]:
    return log.read_text().split() if log.is_file() else []


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def main_store(tmp_path_factory, tiny_teacher, corpus_dir):
    from kdship.cache.run import cache

    out = tmp_path_factory.mktemp("onpolicy") / "store"
    # with the draws' logprobs: the rounds train rkl (the on-policy literature's choice), which needs them
    cache(str(tiny_teacher), str(corpus_dir / "pairs.jsonl"), str(out), mode="score", backend="hf", progress=False, draw_logprobs=True)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, main_store, tiny_teacher, tiny_student, corpus_dir):
    d = tmp_path_factory.mktemp("onpolicy_full")
    run, log = d / "run", d / "opened.txt"
    args = _train_args(main_store, tiny_student, tiny_teacher, corpus_dir / "prompts.jsonl", run)
    proc = subprocess.run(args, env=_env(tiny_teacher, log), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, log


def test_mixed_sampling_draws_from_the_mixture():
    """200k draws on a 5-token vocabulary: chi-square against alpha*q + (1-alpha)*p is small, while
    against p alone or q alone it is huge (so the test cannot pass with an unmixed sampler)."""
    s_logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0])
    t_logits = torch.tensor([-1.0, 1.5, 2.0, 0.0, -2.0])
    p, q = torch.softmax(s_logits, -1), torch.softmax(t_logits, -1)
    alpha, n = 0.3, 200_000
    torch.testing.assert_close(mixed_probs(s_logits[None], t_logits[None], 0.0)[0], p)
    torch.testing.assert_close(mixed_probs(s_logits[None], t_logits[None], 1.0)[0], q)
    gen = torch.Generator().manual_seed(0)
    draws = sample_mixed(s_logits.expand(n, -1), t_logits.expand(n, -1), alpha, gen)
    counts = np.bincount(draws.numpy(), minlength=5)

    def chi2(probs) -> float:
        expected = probs.double().numpy() * n
        return float(((counts - expected) ** 2 / expected).sum())

    # chi-square with 4 degrees of freedom: P(> 30) ~ 5e-6
    assert chi2(alpha * q + (1 - alpha) * p) < 30.0
    assert chi2(p) > 1000 and chi2(q) > 1000
    # seeded: the same generator seed draws the same tokens
    again = sample_mixed(s_logits.expand(n, -1), t_logits.expand(n, -1), alpha, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_phases_split_the_steps():
    assert phase_ends(9, 2) == [3, 6, 9] and phase_ends(10, 3) == [2, 5, 7, 10]


def test_two_rounds_score_with_vllm_mix_round_data_and_never_load_the_teacher(full_run, main_store, tiny_teacher):
    from kdship.store import TEACHER_IDENTITY_KEYS, StoreReader

    run, log = full_run
    main = StoreReader(str(main_store), verify=False).header["teacher"]
    for r in (0, 1):
        gens = [json.loads(x) for x in (run / "rounds" / str(r) / "generations.jsonl").read_text().splitlines()]
        assert gens and all(g["round"] == r and isinstance(g["seed"], int) and g["response"] for g in gens)
        assert len({g["seed"] for g in gens}) == len({g["prompt_index"] for g in gens})  # one seed per (round, prompt)
        reader = StoreReader(str(run / "rounds" / str(r) / "store"))
        assert reader.complete and reader.num_samples() == len(gens)
        assert {k: reader.header["teacher"].get(k) for k in TEACHER_IDENTITY_KEYS} == {k: main.get(k) for k in TEACHER_IDENTITY_KEYS}
        assert reader.header["target_sampling"]["exact"] is False  # scored by vLLM, not the hf reference
    summary = json.loads((run / "rounds" / "summary.json").read_text())
    by_phase = [rec["batches_by_source"] for rec in summary["rounds"]]
    assert by_phase[0] == {"main": 3}
    assert by_phase[1].get("mix_0", 0) + by_phase[2].get("mix_0", 0) + by_phase[2].get("mix_1", 0) > 0  # round data was trained on
    assert "mix_1" not in by_phase[1]  # round 1's store did not exist yet
    assert all(rec["train_tokens"] > 0 for rec in summary["rounds"])
    assert summary["rounds"][0]["seconds"].keys() == {"train", "generate", "score"}
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [s["step"] for s in steps] == list(range(1, 10))
    # CE (default weight 0.5) on the data's tokens only: a round store's tokens are the student's own samples
    for s in steps:
        want = s["kd"] if s.get("source", "main") != "main" else 0.5 * s["kd"] + 0.5 * s["ce"]
        assert s["loss"] == pytest.approx(want, rel=1e-5), s
    assert any(s.get("source", "main") != "main" for s in steps) and any(s.get("source", "main") == "main" for s in steps)
    assert (run / "final" / "model.safetensors").is_file()
    # the training process never opened a file of the teacher (the scorer, a subprocess, did)
    assert _opened(log) == []


def test_resume_after_sigkill_past_round_1_generation_gives_the_same_weights(full_run, main_store, tiny_teacher, tiny_student, corpus_dir, tmp_path):
    run, log = tmp_path / "run", tmp_path / "opened.txt"
    args = _train_args(main_store, tiny_student, tiny_teacher, corpus_dir / "prompts.jsonl", run)
    proc = subprocess.Popen(args, env=_env(tiny_teacher, log), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = run / "rounds" / "state.json"
    try:
        deadline = time.time() + 500
        while time.time() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["phases"][1]["generated"]:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its scoring subprocess
        proc.wait()
    killed_at = json.loads(state.read_text())["phases"]
    assert killed_at[1]["generated"] and not killed_at[2]["trained"], "the run finished before it could be killed"
    gens1 = run / "rounds" / "1" / "generations.jsonl"
    before = (gens1.stat().st_mtime_ns, (run / "rounds" / "0" / "generations.jsonl").stat().st_mtime_ns)
    resumed = subprocess.run(args + ["--resume"], env=_env(tiny_teacher, log), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # nothing finished was recomputed: both rounds' generations are the files written before the kill
    assert (gens1.stat().st_mtime_ns, (run / "rounds" / "0" / "generations.jsonl").stat().st_mtime_ns) == before
    assert gens1.read_text() == (full_run[0] / "rounds" / "1" / "generations.jsonl").read_text()
    a, b = _final_weights(full_run[0]), _final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert _opened(log) == []


@pytest.mark.parametrize("kill_at, phase_done", [("generate:1", "trained"), ("train:7", "scored")])
def test_resume_after_a_crash_inside_generate_or_train_gives_the_same_weights(full_run, main_store, tiny_teacher, tiny_student, corpus_dir, tmp_path, kill_at, phase_done):
    """The run SIGKILLs itself (KDSHIP_TEST_KILL_AT) inside round 1's generation (after its first prompt)
    or inside phase 2's training (after step 7 of 9, past the last checkpoint at 6); --resume then
    gives the uninterrupted run's final weights."""
    from kdship.train.trainer import TEST_KILL_AT

    run, log = tmp_path / "run", tmp_path / "opened.txt"
    args = _train_args(main_store, tiny_student, tiny_teacher, corpus_dir / "prompts.jsonl", run)
    killed = subprocess.run(args, env={**_env(tiny_teacher, log), TEST_KILL_AT: kill_at}, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    phases = json.loads((run / "rounds" / "state.json").read_text())["phases"]
    assert phases[1][phase_done] and not phases[2]["trained"]
    if kill_at.startswith("generate"):
        assert not phases[1]["generated"] and not (run / "rounds" / "1" / "generations.jsonl").exists()  # complete or absent
    else:
        assert not (run / "final").exists()
    resumed = subprocess.run(args + ["--resume"], env=_env(tiny_teacher, log), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "rounds" / "1" / "generations.jsonl").read_text() == (full_run[0] / "rounds" / "1" / "generations.jsonl").read_text()
    a, b = _final_weights(full_run[0]), _final_weights(run)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert _opened(log) == []


def test_mix_teacher_loads_the_teacher_in_the_generate_phase_which_the_hook_sees(main_store, tiny_teacher, tiny_student, corpus_dir, tmp_path):
    """--mix-teacher needs the teacher at generation time: the same audit hook then logs its files, so
    the empty logs of the runs above are evidence, not an artefact of a hook that sees nothing."""
    run, log = tmp_path / "run", tmp_path / "opened.txt"
    args = _train_args(main_store, tiny_student, tiny_teacher, corpus_dir / "prompts.jsonl", run, "--mix-teacher", "0.5")
    args[args.index("--on-policy-rounds") + 1] = "1"
    args[args.index("--max-steps") + 1] = "2"
    args[args.index("--score-backend") + 1] = "hf"
    proc = subprocess.run(args, env=_env(tiny_teacher, log), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(Path(tiny_teacher).resolve() / "config.json") in _opened(log)
    gens = [json.loads(x) for x in (run / "rounds" / "0" / "generations.jsonl").read_text().splitlines()]
    assert gens and all(g["mix_teacher"] == 0.5 for g in gens)
    assert json.loads((run / "rounds" / "summary.json").read_text())["settings"]["mix_teacher"] == 0.5


def test_mixed_loader_is_seeded_resumes_exactly_and_refuses_another_teachers_store(main_store, tiny_teacher, tiny_student, tmp_path):
    from kdship.tiny import build_tiny_llama, synthetic_sentences
    from kdship.train.loader import MixedLoader, StoreLoader
    from kdship.train.trainer import TrainError, train

    from train_stores import write_teacher_store

    texts = [" ".join(synthetic_sentences(30, seed=5)[i : i + 3]) for i in range(0, 30, 3)]
    same = write_teacher_store(tiny_teacher, tmp_path / "same", texts, top_k=8, shard_size=4)

    def mixed(state=None):
        stores = [("main", StoreLoader(str(main_store), 64, seed=1), 0.5), ("mix_0", StoreLoader(str(same), 64, seed=1), 0.5)]
        return MixedLoader(stores, seed=1, state=state)

    def take(loader, n):
        out = []
        for b in loader:
            out.append((b.source, b.input_ids.clone(), b.state))
            if len(out) == n:
                break
        loader.close()
        return out

    full = take(mixed(), 8)
    assert {s for s, _, _ in full} == {"main", "mix_0"}  # both stores were drawn from
    assert [s for s, _, _ in full] == [s for s, _, _ in take(mixed(), 8)]  # seeded
    rest = take(mixed(state=full[3][2]), 4)
    assert [s for s, _, _ in rest] == [s for s, _, _ in full[4:]]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rest, full[4:]))

    other_teacher = build_tiny_llama(tmp_path / "other", hidden=128, layers=2, heads=2, kv_heads=1, seed=5, tokenizer_dir=tiny_teacher)
    other = write_teacher_store(other_teacher, tmp_path / "other_store", texts, top_k=8, shard_size=4)
    with pytest.raises(TrainError, match="another teacher.*weights_sha256"):
        train(str(main_store), student=str(tiny_student), out=str(tmp_path / "run"), max_steps=2, progress=False, mix_stores=[str(other)], mix_fraction=0.5)
    assert not (tmp_path / "run").exists()


def test_round_store_is_scored_with_the_original_stores_draw_options(tmp_path):
    """A round's `kdship cache` command repeats every draw option the base store's header records, so
    the round store is drawn as the base store was; the CLI accepts every flag it writes."""
    from typer.testing import CliRunner

    from kdship.cli import app
    from kdship.train.onpolicy import _score_command

    ts = {"draws": 16, "candidates": 4096, "exact": False, "seed": 0, "head": 4, "draw_logprobs": False, "far_oversample": 3, "far_draws": 4}
    header = {"targets": "headtail", "top_k": 4, "max_length": 512, "target_sampling": ts}
    cmd = _score_command("T", tmp_path / "g.jsonl", tmp_path / "s", header, "vllm", 0)
    flags = " ".join(cmd)
    for want in ("--draws 16", "--no-certain-exact", "--no-draw-logprobs", "--far-oversample 3 --far-draws 4", "--sampled-candidates 4096"):
        assert want in flags, (want, flags)
    assert "--draw-power" not in flags
    cmd = _score_command("T", tmp_path / "g.jsonl", tmp_path / "s", dict(header, target_sampling=dict(ts, draw_power=0.5)), "vllm", 0)
    assert "--draw-power 0.5" in " ".join(cmd)
    # a store written before stratified draws (or with --draw-logprobs): plain draws, whatever the defaults now
    plain = {k: v for k, v in ts.items() if k not in ("far_oversample", "far_draws", "draw_logprobs")}
    flags = " ".join(_score_command("T", tmp_path / "g.jsonl", tmp_path / "s", dict(header, target_sampling=plain), "vllm", 0))
    assert "--far-oversample 1" in flags and "--far-draws" not in flags and "--draw-logprobs" in flags, flags
    res = CliRunner().invoke(app, cmd[cmd.index("cache"):] + ["--help"])
    assert res.exit_code == 0, res.output


def _without(args: list[str], *flags: str) -> list[str]:
    """``args`` less each of ``flags`` and the value after it."""
    out, skip = [], False
    for a in args:
        if skip or a in flags:
            skip = not skip
            continue
        out.append(a)
    return out


def test_epochs_give_the_steps_and_the_stores_teacher_scores_when_no_teacher_is_given(main_store, tiny_teacher, tiny_student, corpus_dir, tmp_path):
    """No --max-steps and no --teacher: --epochs 1 sets the step count (the batches one pass over STORE
    gives, which the phases then split) and the teacher STORE's header records scores the round."""
    from kdship.store import StoreReader
    from kdship.train.loader import StoreLoader
    from kdship.train.trainer import DEFAULTS

    run, log = tmp_path / "run", tmp_path / "opened.txt"
    args = _train_args(main_store, tiny_student, tiny_teacher, corpus_dir / "prompts.jsonl", run, "--epochs", "1")
    args = _without(args, "--max-steps", "--teacher")
    args[args.index("--on-policy-rounds") + 1] = "1"
    args[args.index("--score-backend") + 1] = "hf"
    proc = subprocess.run(args, env=_env(tiny_teacher, log), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one real pass over STORE under the run's batching settings: the steps the run should have
    loader = StoreLoader(str(main_store), 128, seed=DEFAULTS["seed"], heldout_fraction=0.1, eval_samples=4, max_epochs=1)
    n = sum(1 for _ in loader)
    loader.close()
    assert n >= 2
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, n + 1))
    summary = json.loads((run / "rounds" / "summary.json").read_text())
    assert [rec["steps"] for rec in summary["rounds"]] == [[0, n // 2], [n // 2, n]]
    recorded = StoreReader(str(main_store), verify=False).header["teacher"]["name_or_path"]
    assert summary["settings"]["teacher"] == recorded and Path(recorded).samefile(tiny_teacher)
    assert "no --teacher given" in proc.stderr and recorded in proc.stderr
    assert StoreReader(str(run / "rounds" / "0" / "store")).complete  # the recorded teacher scored round 0
    assert (run / "final" / "model.safetensors").is_file()
    assert _opened(log) == []  # found through the header: still never loaded by the trainer


def test_no_teacher_flag_and_a_recorded_teacher_that_is_gone_or_both_step_flags_are_refused(tiny_teacher, tiny_student, corpus_dir, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from kdship.cli import app

    from train_stores import write_teacher_store

    moved = Path(shutil.copytree(tiny_teacher, tmp_path / "teacher"))
    store = write_teacher_store(moved, tmp_path / "store", ["the cat sat on the mat", "a dog ran far away"], top_k=4)
    shutil.rmtree(moved)  # the store still records it
    base = ["train", str(store), "--student", str(tiny_student), "--out", str(tmp_path / "run"), "--no-progress",
            "--on-policy-rounds", "1", "--prompts", str(corpus_dir / "prompts.jsonl")]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2, res.output
    assert f"--teacher is required for --on-policy-rounds: the store records teacher {moved.resolve()}, which is not a directory here" in res.output
    res = CliRunner().invoke(app, base + ["--teacher", str(tiny_teacher), "--epochs", "2", "--max-steps", "4"])
    assert res.exit_code == 2 and "give --max-steps or --epochs, not both" in res.output, res.output
    assert not (tmp_path / "run").exists()
