"""`kdship train --profile-steps`: the step profile (phases, operators, loader rate, a Chrome trace), and
that profiling, compiling or the one-read-per-step loop leave the training itself unchanged."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdship.tiny import synthetic_sentences
from kdship.train.loader import StoreLoader
from kdship.train.profile import PHASE_TITLES, PHASES
from kdship.train.trainer import TrainError, train

from train_stores import write_teacher_store

FAST = dict(progress=False, ce_weight=0.5, heldout_fraction=0.1, eval_samples=16, batch_tokens=384, lr=3e-3, warmup_steps=2, eval_every=0, ckpt_every=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher):
    sents = synthetic_sentences(360, seed=4)
    texts = [" ".join(sents[i : i + 3]) for i in range(0, 360, 3)]  # 120 samples, 3 shards
    return write_teacher_store(tiny_teacher, tmp_path_factory.mktemp("profstore") / "store", texts, top_k=16, shard_size=40)


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_profile_steps_writes_phases_operators_loader_rate_and_a_trace(store, tiny_student, tmp_path):
    run = tmp_path / "run"
    s = train(str(store), student=str(tiny_student), out=str(run), max_steps=6, profile_steps=3, **FAST)
    assert s["steps"] == 6 and s["final"]  # training went on after the profiled window
    prof = json.loads((run / "profile" / "profile.json").read_text())
    assert prof["steps"] == 3 and prof["warmup_steps"] == 2 and prof["device"] == "cpu"
    ph = prof["phases_ms"]
    assert set(ph) == set(PHASES)
    for p in ("forward", "loss", "backward", "optimizer"):
        assert ph[p] > 0, (p, ph)
    assert ph["teacher"] == 0.0  # no online teacher in this run
    # the phases are parts of the step: they cannot add up to more than it
    assert sum(ph.values()) <= prof["step_ms"] * 1.001 and prof["other_ms"] >= 0
    assert prof["tokens_per_s"] > 0 and 0 < prof["tokens_per_step"] <= 384
    assert prof["aten_ops_per_step"] > 50
    assert any(o["op"] == "aten::mm" for o in prof["top_ops"])
    ld = prof["loader"]
    assert ld["decode_positions_per_cpu_s"] > 0 and ld["collate_tokens_per_cpu_s"] > 0
    assert ld["capacity_over_consumption"] == pytest.approx(ld["capacity_tokens_per_s"] / prof["tokens_per_s"])
    md = (run / "profile" / "profile.md").read_text()
    for p in PHASES:
        assert PHASE_TITLES[p] in md
    trace = json.loads((run / "profile" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"kdship.forward", "kdship.loss", "kdship.backward", "kdship.optimizer"} <= names


def test_a_run_shorter_than_the_window_writes_what_it_profiled(store, tiny_student, tmp_path):
    run = tmp_path / "short"
    train(str(store), student=str(tiny_student), out=str(run), max_steps=3, profile_steps=5, **FAST)
    assert json.loads((run / "profile" / "profile.json").read_text())["steps"] == 1  # 3 steps - 2 warm-up


def test_profiling_does_not_change_what_is_trained(store, tiny_student, tmp_path):
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    train(str(store), student=str(tiny_student), out=str(plain), max_steps=6, **FAST)
    train(str(store), student=str(tiny_student), out=str(profiled), max_steps=6, profile_steps=2, **FAST)
    np.testing.assert_allclose(_losses(profiled), _losses(plain), rtol=1e-6)
    assert len(_losses(plain)) == 6


def test_bad_profile_steps_is_refused_by_name(store, tiny_student, tmp_path):
    with pytest.raises(TrainError, match="--profile-steps"):
        train(str(store), student=str(tiny_student), out=str(tmp_path / "r"), max_steps=2, profile_steps=-1, **FAST)


def test_loader_counts_its_own_decode_and_collation_work(store):
    ld = StoreLoader(str(store), 384, seed=0, heldout_fraction=0.0, max_epochs=1)
    tokens = sum(b.tokens for b in ld)
    ld.close()
    assert ld.collated_tokens == tokens
    assert ld.decoded_positions == sum(ld.reader.read_shard(p).num_positions for p in ld.paths)
    assert ld.decode_cpu_s > 0 and ld.collate_cpu_s > 0


def test_cli_profile_steps_prints_where_the_profile_is(store, tiny_student, tmp_path):
    run = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "kdship", "train", str(store), "--student", str(tiny_student), "--out", str(run), "--max-steps", "4",
                        "--profile-steps", "2", "--eval-every", "0", "--ckpt-every", "0", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert str(run / "profile" / "profile.md") in p.stderr
    assert "| **step** |" in (run / "profile" / "profile.md").read_text()


def test_compiled_decoder_trains_like_eager(store, tiny_student, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(str(store), student=str(tiny_student), out=str(eager), max_steps=3, **FAST)
    s = train(str(store), student=str(tiny_student), out=str(compiled), max_steps=3, compile=True, **FAST)
    assert s["final"] and s["parameters"] > 0
    np.testing.assert_allclose(_losses(compiled), _losses(eager), rtol=1e-4)
