"""`kdship train --online-teacher`: full-logit online KD through the same loop as store KD (reference mode)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdship.tiny import build_tiny_llama, build_tokenizer, synthetic_sentences
from kdship.train.trainer import TrainError, train

from train_stores import write_teacher_store

# precision fp32: the online teacher's rows equal the float32 store's only without bf16 autocast (CUDA's default)
FAST = dict(progress=False, precision="fp32", ce_weight=0.0, heldout_fraction=0.1, eval_samples=8, batch_tokens=384, lr=3e-3, warmup_steps=2, ckpt_every=0)


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, tiny_teacher):
    """k = vocabulary, logprobs stored exactly (no BitRound): the store holds the teacher's whole distribution."""
    from transformers import AutoTokenizer

    sents = synthetic_sentences(240, seed=13)
    texts = [" ".join(sents[i : i + 3]) for i in range(0, 240, 3)]  # 80 samples
    V = len(AutoTokenizer.from_pretrained(tiny_teacher))
    return write_teacher_store(tiny_teacher, tmp_path_factory.mktemp("fullstore") / "store", texts, top_k=V, shard_size=40, exact_logprobs=True)


def _records(run: Path, key: str) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in recs if key in r]


def test_online_kd_equals_kd_from_a_full_vocabulary_store(full_store, tiny_teacher, tiny_student, tmp_path):
    """Same loop, same batches: the teacher run online gives the store's loss sequence and held-out KL."""
    a = train(str(full_store), student=str(tiny_student), out=str(tmp_path / "store"), max_steps=8, eval_every=4, **FAST)
    b = train(str(full_store), student=str(tiny_student), out=str(tmp_path / "online"), max_steps=8, eval_every=4, online_teacher=str(tiny_teacher), **FAST)
    assert a["steps"] == b["steps"] == 8
    la, lb = _records(tmp_path / "store", "loss"), _records(tmp_path / "online", "loss")
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 9))
    # differences: fp32 rounding of packed vs one-sample-at-a-time teacher forwards, summation order
    np.testing.assert_allclose([x for _, x in lb], [x for _, x in la], rtol=1e-5)
    ka, kb = _records(tmp_path / "store", "heldout_kl"), _records(tmp_path / "online", "heldout_kl")
    assert [s for s, _ in ka] == [s for s, _ in kb] == [0, 4, 8]
    np.testing.assert_allclose([x for _, x in kb], [x for _, x in ka], rtol=1e-5)
    assert lb[-1][1] < lb[0][1]


def test_online_teacher_with_another_tokenizer_or_vocabulary_is_refused(full_store, tiny_teacher, tiny_student, tmp_path):
    from transformers import AutoModelForCausalLM

    other_tok = tmp_path / "othertok"
    build_tokenizer(other_tok, vocab_size=512, seed=0, corpus=synthetic_sentences(3000, seed=99)[::-1])
    other = build_tiny_llama(tmp_path / "other", hidden=64, layers=1, heads=1, kv_heads=1, tokenizer_dir=other_tok)
    with pytest.raises(TrainError, match="tokenizer mismatch: the online teacher") as e:
        train(str(full_store), student=str(tiny_student), out=str(tmp_path / "r1"), max_steps=1, online_teacher=str(other), **FAST)
    assert str(other) in str(e.value) and "store's teacher" in str(e.value)

    # same tokenizer, padded output table: its distributions are over another vocabulary than the store's
    m = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    m.resize_token_embeddings(m.config.vocab_size + 64)
    m.save_pretrained(tmp_path / "padded")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_teacher) / f, tmp_path / "padded")
    with pytest.raises(TrainError, match="vocabulary mismatch") as e:
        train(str(full_store), student=str(tiny_student), out=str(tmp_path / "r2"), max_steps=1, online_teacher=str(tmp_path / "padded"), **FAST)
    assert "output rows" in str(e.value)
    assert not (tmp_path / "r1" / "final").exists() and not (tmp_path / "r2" / "final").exists()


def test_cli_online_teacher_flag(full_store, tiny_teacher, tiny_student, tmp_path):
    from typer.testing import CliRunner

    from kdship.cli import app

    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", str(full_store), "--student", str(tiny_student), "--out", str(run), "--online-teacher", str(tiny_teacher),
                                 "--max-steps", "2", "--eval-every", "0", "--no-progress", "--batch-tokens", "256"])
    assert r.exit_code == 0, r.output
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["online_teacher"] == str(tiny_teacher)
    r = CliRunner().invoke(app, ["train", str(full_store), "--student", str(tiny_student), "--out", str(tmp_path / "r2"), "--online-teacher", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "--online-teacher" in r.output
