"""The student's own generations for on-policy rounds, optionally teacher-mixed (MiniLLM).

``sample_mixed`` draws each token from ``alpha * p_teacher + (1 - alpha) * p_student`` (MiniLLM's
teacher-mixed sampling; ``alpha = 0`` is plain sampling from the student). ``generate_responses``
runs a plain transformers sampling loop with a KV cache: ``n`` responses per prompt, batched per
prompt, one seeded ``torch.Generator`` per (round, prompt), so a redone round writes the same text.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def generation_seed(seed: int, round_index: int, prompt_index: int) -> int:
    """The seed of one prompt's samples in one round (recorded next to every generation)."""
    d = hashlib.blake2b(f"onpolicy:{seed}:{round_index}:{prompt_index}".encode(), digest_size=4).digest()
    return int.from_bytes(d, "little") & 0x7FFFFFFF


def mixed_probs(student_logits, teacher_logits=None, alpha: float = 0.0, temperature: float = 1.0):
    """[B, V] probabilities alpha * softmax(teacher / T) + (1 - alpha) * softmax(student / T)."""
    import torch

    p = torch.softmax(student_logits.float() / temperature, dim=-1)
    if teacher_logits is None or alpha == 0.0:
        return p
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--mix-teacher must be in [0, 1], got {alpha}")
    q = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    return alpha * q + (1.0 - alpha) * p


def sample_mixed(student_logits, teacher_logits=None, alpha: float = 0.0, generator=None, temperature: float = 1.0):
    """[B] token ids, each drawn from ``mixed_probs`` of its row."""
    import torch

    return torch.multinomial(mixed_probs(student_logits, teacher_logits, alpha, temperature), 1, generator=generator).squeeze(-1)


def _sample_one_prompt(student, teacher, prompt_ids: list[int], n: int, max_new_tokens: int, eos_ids: set[int], vocab: int,
                       alpha: float, temperature: float, seed: int) -> list[list[int]]:
    """``n`` sampled continuations of one prompt (token ids, EOS excluded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids] * n, dtype=torch.long)
    past_s = past_t = None
    step_in = ids
    out: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            o = student(input_ids=step_in, past_key_values=past_s, use_cache=True)
            past_s, s_logits = o.past_key_values, o.logits[:, -1, :vocab]
            t_logits = None
            if teacher is not None:
                ot = teacher(input_ids=step_in, past_key_values=past_t, use_cache=True)
                past_t, t_logits = ot.past_key_values, ot.logits[:, -1, :vocab]
            nxt = sample_mixed(s_logits, t_logits, alpha, gen, temperature)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in eos_ids:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()):
                break
            step_in = nxt.unsqueeze(-1)
    return out


def _generation_record(row, response: str) -> dict[str, Any]:
    """The row to score: the prompt row with the student's response as its answer."""
    if row.kind == "messages":
        msgs = [m for m in row.messages]
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return {"messages": msgs + [{"role": "assistant", "content": response}]}
    return {"prompt": row.prompt if row.kind in ("prompt", "pair") else row.text, "response": response}


def generate_responses(student, tok, prompts: str, out: Path, round_index: int, seed: int, samples_per_prompt: int,
                       max_new_tokens: int, teacher=None, alpha: float = 0.0, temperature: float = 1.0) -> dict[str, Any]:
    """Write ``out`` (JSONL, atomically: temp file + rename) with ``samples_per_prompt`` responses per
    prompt row of ``prompts``; empty responses are counted and left out (nothing to score). Returns stats."""
    from kdship.data import read_rows
    from kdship.render import render_prompt

    rows, _ = read_rows(prompts)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_cfg = getattr(student, "generation_config", None)
    extra_eos = getattr(gen_cfg, "eos_token_id", None)
    eos |= set(extra_eos if isinstance(extra_eos, list) else [extra_eos] if extra_eos is not None else [])
    vocab = len(tok)
    student.eval()
    records, tokens, empty = [], 0, 0
    from kdship.train.trainer import kill_point_for_tests

    for n, row in enumerate(rows):
        if n == 1:
            kill_point_for_tests("generate", round_index)  # tests: a crash after the first prompt's samples
        s = generation_seed(seed, round_index, row.index)
        outs = _sample_one_prompt(student, teacher, render_prompt(row, tok), samples_per_prompt, max_new_tokens, eos, vocab, alpha, temperature, s)
        for j, ids in enumerate(outs):
            tokens += len(ids)
            text = tok.decode(ids, skip_special_tokens=True)
            if not text.strip():
                empty += 1
                continue
            records.append({**_generation_record(row, text), "round": round_index, "prompt_index": row.index, "sample": j, "seed": s,
                            "mix_teacher": alpha})
    if not records:
        raise ValueError(f"round {round_index}: the student wrote only empty responses to {prompts}; nothing to score")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return {"prompts": len(rows), "responses": len(records), "empty_responses": empty, "generated_tokens": tokens}
