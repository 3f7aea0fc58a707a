"""End to end with real parts: `kdship cache` (vLLM engine) -> `kdship train` -> the student in vLLM."""

import numpy as np
import pytest

from kdship.tiny import synthetic_sentences, write_jsonl

from train_stores import write_teacher_store


@pytest.fixture(scope="module")
def vllm_store(tmp_path_factory, tiny_teacher):
    from kdship.cache.run import cache

    d = tmp_path_factory.mktemp("vllm_train")
    sents = synthetic_sentences(450, seed=11)
    data = write_jsonl(d / "text.jsonl", [{"text": " ".join(sents[i : i + 3])} for i in range(0, 450, 3)])
    summary = cache(str(tiny_teacher), str(data), str(d / "store"), top_k=16, backend="vllm", shard_size=50, progress=False)
    assert summary["complete"] and summary["samples"] == 150
    return d / "store"


def test_real_run_on_a_vllm_store_lowers_heldout_kl_and_vllm_loads_the_student(vllm_store, tiny_student, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from kdship.cache.vllm_backend import VLLMBackend
    from kdship.train.trainer import train

    run = tmp_path / "run"
    s = train(str(vllm_store), student=str(tiny_student), out=str(run), max_steps=40, batch_tokens=512, lr=3e-3, eval_every=20,
              ckpt_every=0, heldout_fraction=0.1, eval_samples=16, ce_weight=0.0, progress=False)
    assert s["heldout_kl_last"] < 0.95 * s["heldout_kl_first"], s
    # the final student runs in the vLLM engine and agrees with transformers
    be = VLLMBackend(str(run / "final"), max_model_len=128)
    seq = [1, 40, 41, 42, 43, 44, 45, 46]
    (ids, lps), = be.score([seq], top_k=4)
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
    for j in range(1, len(seq)):
        np.testing.assert_allclose(lps[j], ref[j - 1, ids[j]].numpy(), atol=1e-3)


def test_sampled_targets_store_trains(tiny_teacher, tiny_student, tmp_path):
    """A `targets: sampled` store (12 draws per position, importance weights) lowers held-out KL too."""
    from kdship.train.trainer import train

    sents = synthetic_sentences(300, seed=21)
    texts = [" ".join(sents[i : i + 3]) for i in range(0, 300, 3)]
    store = write_teacher_store(tiny_teacher, tmp_path / "sampled", texts, top_k=12, sampled_draws=12, shard_size=50)
    s = train(str(store), student=str(tiny_student), out=str(tmp_path / "run"), max_steps=30, batch_tokens=512, lr=3e-3,
              eval_every=0, ckpt_every=0, heldout_fraction=0.1, eval_samples=16, ce_weight=0.0, progress=False)
    assert s["heldout_kl_last"] < 0.97 * s["heldout_kl_first"], s
    with pytest.raises(Exception, match="temperature"):
        train(str(store), student=str(tiny_student), out=str(tmp_path / "r2"), max_steps=1, temperature=2.0, progress=False)


def test_sft_on_a_vllm_generate_store_learns_the_teacher_generations(tiny_teacher, tiny_student, tmp_path):
    """Sequence-level KD: --loss sft on `--mode generate` samples; only generated positions are trained."""
    import json

    from kdship.cache.run import cache
    from kdship.store import StoreReader
    from kdship.train.loader import StoreLoader
    from kdship.train.trainer import train

    sents = synthetic_sentences(40, seed=31)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": s} for s in sents])
    cache(str(tiny_teacher), str(data), str(tmp_path / "gen"), mode="generate", samples=2, max_new_tokens=24, temperature=1.0,
          top_k=8, backend="vllm", shard_size=40, progress=False)
    reader = StoreReader(str(tmp_path / "gen"))
    trained = sum(int(sh.loss_mask[1:].sum()) for _, sh in reader.iter_shards())  # generated positions
    ld = StoreLoader(str(tmp_path / "gen"), batch_tokens=100000, heldout_fraction=0.0, max_epochs=1)
    assert sum(len(b.rows.targets) for b in ld) == trained < reader.num_positions()
    run = tmp_path / "run"
    train(str(tmp_path / "gen"), student=str(tiny_student), out=str(run), loss="sft", max_steps=25, batch_tokens=400, lr=3e-3,
          heldout_fraction=0.0, eval_every=0, ckpt_every=0, progress=False)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
