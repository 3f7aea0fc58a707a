"""Check an export against the PyTorch model it came from, and measure what it keeps of the teacher.

* ONNX fp32: logits on fixed prompts, run as one left-padded batch through prefill (empty past) and
  ``new_tokens`` incremental decode steps fed with PyTorch's greedy tokens (teacher forcing), vs a
  PyTorch full forward over each unpadded prompt + continuation. Max |logit diff| must stay within
  ``atol``; free-running greedy continuations (``OnnxCausalLM.generate``) must equal PyTorch's.
  A divergence where PyTorch's own top-2 logits are closer than 10 * atol is reported as a tie,
  not a failure (an fp32 rounding difference can legitimately flip an exact tie).
* ONNX int8: the same numbers, reported only (quantisation drift is expected): max |logit diff|,
  top-1 agreement on the teacher-forced steps (% of generated positions where int8's argmax is
  PyTorch's greedy token) and identical free-running continuations.
* HF: the written folder reloaded with transformers gives the same logits; vLLM loads it and its
  greedy continuations are compared with PyTorch's.
* With a store: forward KL(teacher || model) on held-out store positions for every format.
  Held-out samples are chosen as ``kdship train`` does (``kdship.train.loader.heldout_mask`` on the
  sample hash), so the student never trained on them. Per row j (a trained row with targets)::

      t_i = stored teacher logprob of id_i (i = 1..K),   s_i = log q(id_i | tokens < j)
      p_rest = 1 - sum_i exp(t_i),  q_rest = 1 - sum_i exp(s_i)
      KL = sum_i exp(t_i) (t_i - s_i) + p_rest (log p_rest - log q_rest)

  (the trainer's ``fkl`` with the ``bucket`` tail: the K stored ids plus one "rest" category),
  averaged over rows, in nats.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from kdship.divergence import topk_rest_kl

log = logging.getLogger(__name__)

class VerificationError(RuntimeError):
    """The export does not reproduce the PyTorch model within the bound; the report says where."""


def fixed_prompts(tokenizer, n: int, max_tokens: int = 24) -> list[list[int]]:
    """``n`` fixed prompts of different lengths (seeded synthetic sentences), at least 2 tokens each."""
    from kdship.tiny import synthetic_sentences

    out = []
    for i, s in enumerate(synthetic_sentences(n, seed=4242)):
        ids = tokenizer(s, add_special_tokens=True)["input_ids"]
        ids = ids[: max(2, min(max_tokens, 3 + 3 * i))]  # lengths differ, so the batch is left-padded
        out.append([int(t) for t in ids])
    return out


def torch_reference(model, prompts: list[list[int]], new_tokens: int) -> list[dict[str, np.ndarray]]:
    """PyTorch greedy continuation (``new_tokens`` exactly, EOS ignored) and the full-forward logits
    [len(prompt) + new_tokens - 1, V] over prompt + continuation (row r predicts token r + 1)."""
    import torch

    dev = next(model.parameters()).device
    refs = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            out = model(input_ids=torch.tensor([seq], device=dev), use_cache=True)
            past = out.past_key_values
            for _ in range(new_tokens):
                nxt = int(out.logits[0, -1].argmax())
                seq.append(nxt)
                out = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=past, use_cache=True)
                past = out.past_key_values
            full = model(input_ids=torch.tensor([seq], device=dev)).logits[0, :-1].float().cpu().numpy()
            refs.append({"tokens": np.asarray(seq[len(p):], np.int64), "logits": full})
    return refs


def compare_onnx(lm, prompts: list[list[int]], refs: list[dict[str, np.ndarray]], atol: float | None) -> dict[str, Any]:
    """Left-padded batch prefill + teacher-forced decode vs the references; then free-running greedy."""
    from kdship.runtime.onnx import position_ids_from_mask

    new_tokens = len(refs[0]["tokens"])
    ids, mask = lm.left_pad(prompts)
    b, L = ids.shape
    logits, past = lm.forward(ids, mask, position_ids_from_mask(mask, L), lm.new_past(b))
    max_diff_prefill = 0.0
    max_diff_decode = 0.0
    agree = total = 0
    finite = bool(np.isfinite(logits[mask.astype(bool)]).all())
    for r, p in enumerate(prompts):
        got = logits[r, L - len(p) :]  # rows predicting tokens 1..len(p) (the last predicts gen token 0)
        want = refs[r]["logits"][: len(p)]
        max_diff_prefill = max(max_diff_prefill, float(np.abs(got - want).max()))
    step_logits = logits[:, -1]
    for step in range(new_tokens):
        forced = np.asarray([refs[r]["tokens"][step] for r in range(b)], np.int64)
        argmax = step_logits.argmax(-1)
        agree += int((argmax == forced).sum())
        total += b
        if step == new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        out, past = lm.forward(forced[:, None], mask, (mask.sum(-1, keepdims=True) - 1).astype(np.int64), past)
        step_logits = out[:, -1]
        finite &= bool(np.isfinite(step_logits).all())
        for r, p in enumerate(prompts):
            want = refs[r]["logits"][len(p) + step]
            max_diff_decode = max(max_diff_decode, float(np.abs(step_logits[r] - want).max()))
    free = lm.generate(prompts, new_tokens, stop_token_ids=[])
    identical, ties, divergences = 0, 0, []
    for r, (g, ref) in enumerate(zip(free, refs)):
        want = ref["tokens"].tolist()
        if g == want:
            identical += 1
            continue
        k = next(i for i, (x, y) in enumerate(zip(g, want)) if x != y)
        row = ref["logits"][len(prompts[r]) - 1 + k]
        top2 = np.sort(row)[-2:]
        gap = float(top2[1] - top2[0])
        tie = atol is not None and gap < 10 * atol
        ties += int(tie)
        divergences.append({"prompt": r, "step": k, "onnx": g[k], "pytorch": want[k], "pytorch_top2_gap": gap, "tie": tie})
    res = {
        "max_abs_logit_diff": max(max_diff_prefill, max_diff_decode),
        "max_abs_logit_diff_prefill": max_diff_prefill,
        "max_abs_logit_diff_decode": max_diff_decode,
        "finite": finite,
        "top1_agreement": agree / max(total, 1),
        "greedy_identical": identical,
        "greedy_prompts": len(prompts),
        "greedy_ties": ties,
        "divergences": divergences[:10],
    }
    if atol is not None:
        res["atol"] = atol
        res["passed"] = bool(finite and res["max_abs_logit_diff"] <= atol and identical + ties == len(prompts))
    return res


def compare_hf_reload(hf_dir: str | Path, prompts: list[list[int]], refs: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Reload the written HF folder with transformers (float32) and compare its logits."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    diff = 0.0
    with torch.no_grad():
        for p, ref in zip(prompts, refs):
            seq = list(p) + ref["tokens"].tolist()
            got = m(input_ids=torch.tensor([seq])).logits[0, :-1].numpy()
            diff = max(diff, float(np.abs(got - ref["logits"]).max()))
    return {"max_abs_logit_diff": diff, "passed": diff <= 1e-4}


# -- vLLM ----------------------------------------------------------------------------------------
def vllm_engine(hf_dir: str | Path, vocab_size: int):
    """One vLLM engine for the exported HF folder (in-process on the CPU: starts in seconds).

    Full-vocabulary prompt logprobs (needed for KL at the teacher's ids) only for vocabularies up
    to 65536; above that the KL column for vLLM is skipped (a dict/list entry per vocabulary id per
    position would dominate the run).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from kdship.runtime.vllm_engine import get_engine

    max_lp = -1 if vocab_size <= 65536 else 256
    return get_engine(str(hf_dir), max_logprobs=max_lp, max_model_len=None), max_lp


def compare_vllm(llm, prompts: list[list[int]], refs: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    from vllm import SamplingParams, TokensPrompt

    new_tokens = len(refs[0]["tokens"])
    # ignore_eos alone: min_tokens would also ban EOS from the argmax, unlike the PyTorch reference
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=1, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    identical = 0
    lp_diff = 0.0
    for out, ref, p in zip(outs, refs, prompts):
        c = out.outputs[0]
        toks = list(c.token_ids)
        identical += int(toks == ref["tokens"].tolist())
        # logprob of each sampled token vs PyTorch's log_softmax at the same step (while tokens agree)
        lsm = _log_softmax(ref["logits"][len(p) - 1 :])
        for i, t in enumerate(toks):
            if t != ref["tokens"][i]:
                break
            lp = _flat_or_dict_logprob(c.logprobs, i, t)
            if lp is not None:
                lp_diff = max(lp_diff, abs(lp - float(lsm[i, t])))
    return {"greedy_identical": identical, "greedy_prompts": len(prompts), "max_abs_logprob_diff": lp_diff}


def _flat_or_dict_logprob(lps, i: int, token: int) -> float | None:
    if lps is None:
        return None
    if hasattr(lps, "start_indices"):
        a, b = lps.start_indices[i], lps.end_indices[i]
        for j in range(a, b):
            if lps.token_ids[j] == token:
                return float(lps.logprobs[j])
        return None
    d = lps[i]
    return float(d[token].logprob) if d and token in d else None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# -- KL to the teacher on held-out store positions -------------------------------------------------
def heldout_rows(store: str, max_positions: int, max_len: int, heldout_fraction: float) -> list[dict[str, np.ndarray]]:
    """Held-out samples (as ``kdship train`` picks them) with their scored rows, up to ``max_positions``
    rows in all. If the hash rule selects none (a tiny store), the last sample is used and the report
    says so via ``heldout_rule``."""
    from kdship.store import StoreReader, teacher_entries
    from kdship.heldout import heldout_mask

    reader = StoreReader(store)
    picked, n_rows = [], 0
    fallback = []
    for _, shard in reader.iter_shards():
        held = heldout_mask(shard.sample_hash, heldout_fraction)
        for i in range(shard.num_samples):
            s = shard.sample(i)
            toks = s["tokens"][:max_len]
            ids, lps = teacher_entries(s)
            rows = np.nonzero(s["loss_mask"][:max_len] & (ids[:max_len] >= 0).any(1))[0]
            rows = rows[rows >= 1]
            if not len(rows):
                continue
            item = {"tokens": toks.astype(np.int64), "rows": rows, "ids": ids[rows], "lps": lps[rows]}
            if held[i]:
                picked.append(item)
                n_rows += len(rows)
                if n_rows >= max_positions:
                    return picked
            else:
                fallback = [item]
    if not picked and fallback:
        fallback[0]["fallback"] = True
        return fallback
    return picked


def kl_from_logprob_fn(samples: list[dict[str, np.ndarray]], logprobs_fn) -> float:
    """Mean KL over all rows; ``logprobs_fn(tokens) -> [len(tokens), V]`` log-probs where row r
    predicts token r + 1."""
    kls = []
    for smp in samples:
        lp = logprobs_fn(smp["tokens"])
        s = np.take_along_axis(lp[smp["rows"] - 1], np.maximum(smp["ids"], 0).astype(np.int64), axis=1)
        kls.append(topk_rest_kl(smp["ids"], smp["lps"], s))
    return float(np.concatenate(kls).mean()) if kls else float("nan")


def torch_logprobs_fn(model):
    import torch

    dev = next(model.parameters()).device

    def fn(tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(tokens[None], device=dev)).logits[0].float()
            return torch.log_softmax(logits, -1).cpu().numpy()

    return fn


def onnx_logprobs_fn(lm):
    def fn(tokens: np.ndarray) -> np.ndarray:
        ids = tokens[None].astype(np.int64)
        mask = np.ones_like(ids)
        logits, _ = lm.forward(ids, mask, np.arange(ids.shape[1], dtype=np.int64)[None], lm.new_past(1))
        return _log_softmax(logits[0])

    return fn


# Full-vocabulary prompt logprobs come back as Python lists: ~40 bytes per (position, id). Requests
# go in groups of at most this many entries, so 49k-vocabulary students stay within ~1 GB.
VLLM_KL_ENTRIES_PER_CALL = 25_000_000


def _vllm_prompt_logprobs(llm, samples, params, vocab: int):
    """(sample, RequestOutput) pairs, requested a bounded group at a time."""
    from vllm import TokensPrompt

    groups: list[list] = []
    entries = 0
    for smp in samples:
        n = len(smp["tokens"]) * vocab
        if not groups or entries + n > VLLM_KL_ENTRIES_PER_CALL:
            groups.append([])
            entries = 0
        groups[-1].append(smp)
        entries += n
    for group in groups:
        outs = llm.generate([TokensPrompt(prompt_token_ids=g["tokens"].tolist()) for g in group], params, use_tqdm=False)
        yield from zip(group, outs)


def vllm_kl(llm, samples: list[dict[str, np.ndarray]], vocab: int) -> float:
    """vLLM's prompt logprobs over the whole vocabulary (``prompt_logprobs=-1``, flat) at the rows."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=-1, flat_logprobs=True, temperature=0.0, detokenize=False)
    kls = []
    for smp, out in _vllm_prompt_logprobs(llm, samples, params, vocab):
        plp = out.prompt_logprobs
        table = np.full((len(smp["tokens"]), vocab), -np.inf)
        if hasattr(plp, "start_indices"):
            tok = np.asarray(plp.token_ids, np.int64)
            lp = np.asarray(plp.logprobs, np.float64)
            for j in range(1, len(smp["tokens"])):
                a, b = plp.start_indices[j], plp.end_indices[j]
                table[j, tok[a:b]] = lp[a:b]
        else:
            for j in range(1, len(smp["tokens"])):
                for t, v in (plp[j] or {}).items():
                    table[j, t] = v.logprob
        s = np.take_along_axis(table[smp["rows"]], np.maximum(smp["ids"], 0).astype(np.int64), axis=1)
        kls.append(topk_rest_kl(smp["ids"], smp["lps"], s))
    return float(np.concatenate(kls).mean()) if kls else float("nan")
