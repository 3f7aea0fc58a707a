"""`kdship train` on real Zarr stores written from the tiny teacher (transformers forward)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdship.tiny import build_tiny_llama, build_tokenizer, synthetic_sentences
from kdship.heldout import heldout_mask
from kdship.train.loader import StoreLoader
from kdship.train.trainer import TrainError, train

from train_stores import write_teacher_store

FAST = dict(progress=False, ce_weight=0.0, heldout_fraction=0.1, eval_samples=16, batch_tokens=384, lr=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def kd_store(tmp_path_factory, tiny_teacher):
    sents = synthetic_sentences(480, seed=3)
    texts = [" ".join(sents[i : i + 3]) for i in range(0, 480, 3)]  # 160 samples, 4 shards
    return write_teacher_store(tiny_teacher, tmp_path_factory.mktemp("kdstore") / "store", texts, top_k=16, shard_size=40)


def _losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_training_lowers_heldout_kl_and_writes_a_loadable_student(kd_store, tiny_student, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    s = train(str(kd_store), student=str(tiny_student), out=str(run), max_steps=30, eval_every=10, ckpt_every=15, **FAST)
    assert s["steps"] == 30 and s["final"] == str(run / "final")
    assert s["heldout_kl_last"] < 0.97 * s["heldout_kl_first"], s
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "heldout_kl" in x]
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert {"loss", "kd", "ce", "lr", "tokens_per_s", "peak_mem_mb"} <= rec.keys()
    assert (run / "loss.png").stat().st_size > 1000 and (run / "config.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_student).get_vocab()
    # the saved weights are the trained ones: different from the starting student's
    start = AutoModelForCausalLM.from_pretrained(tiny_student)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)


def test_resume_reproduces_the_uninterrupted_loss_sequence(kd_store, tiny_student, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(str(kd_store), student=str(tiny_student), out=str(full), max_steps=12, ckpt_every=4, eval_every=0, **FAST)
    s1 = train(str(kd_store), student=str(tiny_student), out=str(cut), max_steps=12, ckpt_every=4, eval_every=0, stop_after=6, **FAST)
    assert s1["steps"] == 6 and s1["final"] is None
    # a crash after step 6 but before its checkpoint landed: resume must redo steps 5 and 6
    shutil.rmtree(cut / "checkpoints" / "step_0000006")
    with pytest.raises(TrainError, match="earlier run"):
        train(str(kd_store), student=str(tiny_student), out=str(cut), max_steps=12, ckpt_every=4, eval_every=0, **FAST)
    s2 = train(str(kd_store), student=str(tiny_student), out=str(cut), max_steps=12, ckpt_every=4, eval_every=0, resume=True, **FAST)
    assert s2["resumed_from"].endswith("step_0000004") and s2["steps"] == 12
    a, b = _losses(full), _losses(cut)
    assert [x[0] for x in b] == list(range(1, 13))
    np.testing.assert_allclose([x[1] for x in b], [x[1] for x in a], rtol=1e-6)


def test_mismatched_tokenizer_is_refused_naming_both(kd_store, tmp_path):
    other_tok = tmp_path / "othertok"
    build_tokenizer(other_tok, vocab_size=512, seed=0, corpus=synthetic_sentences(3000, seed=99)[::-1])
    other = build_tiny_llama(tmp_path / "other", hidden=64, layers=1, heads=1, kv_heads=1, tokenizer_dir=other_tok)
    with pytest.raises(TrainError, match="tokenizer mismatch") as e:
        train(str(kd_store), student=str(other), out=str(tmp_path / "run"), max_steps=1, **FAST)
    msg = str(e.value)
    assert str(other) in msg and "teacher" in msg and "differ" in msg
    assert not (tmp_path / "run" / "final").exists()


def test_padded_embedding_table_trains_and_fresh_init_from_config(kd_store, tiny_student, tiny_teacher, tmp_path):
    """Same tokenizer, larger (padded) vocabulary table: accepted; ids beyond the tokenizer never targets."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_student)
    m.resize_token_embeddings(m.config.vocab_size + 64)
    m.save_pretrained(tmp_path / "padded")
    shutil.copy(Path(tiny_student) / "tokenizer.json", tmp_path / "padded")
    shutil.copy(Path(tiny_student) / "tokenizer_config.json", tmp_path / "padded")
    s = train(str(kd_store), student=str(tmp_path / "padded"), out=str(tmp_path / "r1"), max_steps=3, eval_every=0, **FAST)
    assert np.isfinite(s["loss_last"])

    s = train(str(kd_store), out=str(tmp_path / "r2"), init_from_config=str(tiny_teacher), layers=1, hidden=64, max_steps=3, eval_every=0, **FAST)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "r2" / "final")
    assert fresh.config.num_hidden_layers == 1 and fresh.config.hidden_size == 64
    with pytest.raises(TrainError, match="not both"):
        train(str(kd_store), student=str(tiny_student), init_from_config=str(tiny_teacher), out=str(tmp_path / "r3"), max_steps=1, **FAST)


def test_config_yaml_with_flag_override_is_saved(kd_store, tiny_student, tmp_path):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text("loss: jsd\nbeta: 0.3\nlr: 0.001\nmax_steps: 2\nbatch-tokens: 256\n")
    run = tmp_path / "run"
    train(str(kd_store), student=str(tiny_student), out=str(run), config=str(cfg), lr=0.002, eval_every=0, progress=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"] == "jsd" and saved["beta"] == 0.3 and saved["lr"] == 0.002 and saved["batch_tokens"] == 256
    cfg.write_text("los: fkl\n")
    with pytest.raises(Exception, match="los"):
        train(str(kd_store), student=str(tiny_student), out=str(tmp_path / "r2"), config=str(cfg))


def test_loader_order_is_deterministic_covers_each_sample_once_and_resumes(kd_store):
    def epoch_tokens(**kw):
        ld = StoreLoader(str(kd_store), batch_tokens=300, seed=5, heldout_fraction=0.1, max_epochs=1, **kw)
        return [(tuple(b.input_ids.flatten().tolist()), b.state) for b in ld]

    a, b = epoch_tokens(), epoch_tokens(workers=1, shuffle_shards=4)
    assert a == b
    c = [x[0] for x in StoreLoader_iter(kd_store, seed=6)]
    assert c != [x[0] for x in a]
    # resume from the state after batch 3: the same remaining batches
    rest = epoch_tokens(state=a[2][1])
    assert [x[0] for x in rest] == [x[0] for x in a[3:]]
    # every non-held-out sample exactly once per epoch; held-out ones never
    from kdship.store import StoreReader

    reader = StoreReader(str(kd_store))
    want, held = [], []
    for _, sh in reader.iter_shards():
        hm = heldout_mask(sh.sample_hash, 0.1)
        for i in range(sh.num_samples):
            (held if hm[i] else want).append(tuple(sh.sample(i)["tokens"][:-1].tolist()))
    ld = StoreLoader(str(kd_store), batch_tokens=300, seed=5, heldout_fraction=0.1, max_epochs=1)
    seen = []
    for bt in ld:
        for row, pos in zip(bt.input_ids.tolist(), bt.position_ids.tolist()):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            seen += [tuple(row[s:e]) for s, e in zip(starts, starts[1:])]
    seen = [s for s in seen if s in set(want) or s in set(held)]  # drop padding segments
    assert sorted(seen) == sorted(want) and held and not set(held) & set(seen)
    assert ld.count_batches() == len(a)
    assert len(ld.eval_batches()) >= 1


def StoreLoader_iter(store, seed):
    return [(tuple(b.input_ids.flatten().tolist()), b.state) for b in StoreLoader(str(store), batch_tokens=300, seed=seed, heldout_fraction=0.1, max_epochs=1)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(kd_store, tiny_student, tmp_path, mode):
    """torchrun --nproc-per-node 2 (gloo, CPU; DDP or --fsdp) vs one process: equal losses step by step,
    with the two-process run stopped after step 3 (its checkpoint written by both ranks) and resumed."""
    args = ["--student", str(tiny_student), "--max-steps", "6", "--batch-tokens", "600", "--lr", "3e-3", "--eval-every", "3",
            "--ckpt-every", "3", "--heldout-fraction", "0.1", "--eval-samples", "8", "--no-progress", "--warmup-steps", "2"]
    one = tmp_path / "one"
    train(str(kd_store), student=str(tiny_student), out=str(one), max_steps=6, batch_tokens=600, lr=3e-3, eval_every=3, ckpt_every=0,
          heldout_fraction=0.1, eval_samples=8, progress=False, warmup_steps=2)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
           "-m", "kdship", "train", str(kd_store), "--out", str(two), *args, *(["--fsdp"] if mode == "fsdp" else [])]
    p = subprocess.run(cmd + ["--stop-after", "3"], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (two / "checkpoints" / "step_0000003").is_dir() and not (two / "final").exists()
    p = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from"].endswith("step_0000003")
    a, b = _losses(one), _losses(two)
    assert [x[0] for x in a] == [x[0] for x in b] == list(range(1, 7))
    np.testing.assert_allclose([x[1] for x in b], [x[1] for x in a], rtol=2e-4)
    # held-out KL by step (the session that stopped at step 3 also evaluated there before stopping)
    ev = lambda r: {json.loads(x)["step"]: json.loads(x)["heldout_kl"] for x in (r / "metrics.jsonl").read_text().splitlines() if "heldout_kl" in x}  # noqa: E731
    assert sorted(ev(two)) == sorted(ev(one))
    np.testing.assert_allclose([ev(two)[k] for k in sorted(ev(one))], [ev(one)[k] for k in sorted(ev(one))], rtol=2e-4)
    assert (two / "final" / "model.safetensors").is_file()


def test_sequence_averaging_weights_each_sample_equally(kd_store):
    """--average sequence: each sample's rows share 1/num_samples; token: every row 1/num_rows."""
    for avg in ("token", "sequence"):
        ld = StoreLoader(str(kd_store), batch_tokens=300, seed=1, heldout_fraction=0.1, max_epochs=1, average=avg)
        b = next(iter(ld))
        ld.close()
        w = b.rows.row_weight.double()
        assert w.sum().item() == pytest.approx(1.0, rel=1e-6)
        if avg == "token":
            assert torch_allclose_const(w, 1.0 / b.global_rows)
        else:
            # a sample's first trained row is predicted from its position 0; per-sample sums are all equal
            seg = np.cumsum(b.position_ids.flatten()[b.pred_index].numpy() == 0)
            sums = [w[seg == s].sum().item() for s in np.unique(seg)]
            assert np.allclose(sums, sums[0]) and len(set(np.round(w.numpy(), 9))) > 1


def torch_allclose_const(w, c):
    return bool(((w - c).abs() < 1e-9).all())


def test_cli_refuses_bad_input_clearly(tmp_path, tiny_student):
    from typer.testing import CliRunner

    from kdship.cli import app

    r = CliRunner().invoke(app, ["train", str(tmp_path / "nostore"), "--student", str(tiny_student), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "no kdship store" in r.output
    r = CliRunner().invoke(app, ["train", str(tmp_path / "nostore"), "--loss", "kl9", "--student", str(tiny_student)])
    assert r.exit_code == 2
    r = CliRunner().invoke(app, ["train", str(tmp_path / "nostore"), "--precision", "fp16", "--student", str(tiny_student)])
    assert r.exit_code == 2 and "--precision 'fp16'" in r.output


def test_precision_picks_the_autocast_dtype():
    import torch

    from kdship.train.trainer import autocast_dtype

    assert autocast_dtype("auto", "cuda") is torch.bfloat16 and autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("fp32", "cuda") is None and autocast_dtype("bf16", "cpu") is torch.bfloat16


def test_final_is_replaced_so_that_a_complete_student_always_exists(tmp_path):
    """RUN/final is replaced by two renames; a crash between them leaves final.previous, which the
    readers take (export's resolve_model_dir, eval's loader, both through final_dir), and the next save
    replaces cleanly."""
    from kdship.export.hf import resolve_model_dir
    from kdship.run_manifest import FINAL_PREVIOUS_DIR, final_dir, replace_final

    run = tmp_path / "run"
    for name, marker in (("a", "old"), ("b", "new")):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"marker": marker}))
        (d / "model.safetensors").write_bytes(b"")
    run.mkdir()
    replace_final(tmp_path / "a", run)
    assert json.loads((run / "final" / "config.json").read_text())["marker"] == "old"
    # the crash state: the old final renamed aside, the new one not yet moved in
    os.replace(run / "final", run / FINAL_PREVIOUS_DIR)
    assert final_dir(run) == run / FINAL_PREVIOUS_DIR and resolve_model_dir(run) == run / FINAL_PREVIOUS_DIR
    replace_final(tmp_path / "b", run)
    assert json.loads((run / "final" / "config.json").read_text())["marker"] == "new"
    assert not (run / FINAL_PREVIOUS_DIR).exists() and final_dir(run) == run / "final"


def test_peak_memory_is_the_trainers_own_not_its_parents():
    """Linux carries ru_maxrss over fork + exec: a trainer started by a big process (a notebook, a
    pipeline holding a teacher) must not report its parent's peak as its own."""
    code = "import torch; from kdship.train.trainer import _peak_memory_mb; print(_peak_memory_mb(torch.device('cpu')))"
    big = bytearray(768 << 20)
    big[:: 4096] = b"\x01" * len(range(0, len(big), 4096))  # touch every page: 768 MiB resident here
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 700, out.stdout  # torch alone is a few hundred MiB
    del big


def test_loader_close_stops_its_batch_thread_when_the_consumer_stopped_early(kd_store):
    """--stop-after and on-policy phases stop consuming mid-epoch: close() must leave no batch thread
    running (one still inside torch's C++ at interpreter exit aborted the process)."""
    import threading

    ld = StoreLoader(str(kd_store), batch_tokens=100, seed=0, heldout_fraction=0.1, max_epochs=3, prefetch_batches=1)
    it = iter(ld)
    next(it)
    time.sleep(0.5)  # the producer fills the queue and waits on it
    t0 = time.perf_counter()
    ld.close()
    assert time.perf_counter() - t0 < 30
    assert not [t for t in threading.enumerate() if t.name == "kdship-batches" and t.is_alive()]
    del it
