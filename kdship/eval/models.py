"""Models under evaluation: a HF causal LM directory (transformers, CUDA when present) or a kdship ONNX
export folder (``OUT/onnx``, run with ONNX Runtime through ``kdship.runtime.onnx``).

Both give the same three operations on token ids:
- ``logprob_rows(seqs, positions)`` -> per sequence the full log-softmax rows [n, V] that predict
  tokens at ``positions`` (row for position j comes from the logits at j-1);
- ``generate(prompts, max_new_tokens)`` -> greedy continuations (stopping at EOS; EOS not returned);
- ``tokenizer`` (a transformers tokenizer) and ``vocab_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from kdship.run_manifest import final_dir


class ModelLoadError(ValueError):
    pass


def is_onnx_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "kdship_onnx.json").is_file() or (p / "onnx" / "kdship_onnx.json").is_file()


def load_model(name: str, path: str | Path, device: str | None = None, dtype: str = "float32"):
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model {name!r}: {p} does not exist")
    if is_onnx_dir(p):
        return OnnxEvalModel(name, p)
    if (final_dir(p) / "config.json").is_file() and not (p / "config.json").is_file():
        p = final_dir(p)  # a `kdship train` output folder
    if (p / "hf" / "config.json").is_file() and not (p / "config.json").is_file():
        p = p / "hf"  # a `kdship export` output folder
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model {name!r}: {path} is neither a HF model folder (config.json) nor a kdship ONNX export")
    return HFEvalModel(name, p, device=device, dtype=dtype)


class HFEvalModel:
    kind = "hf"

    def __init__(self, name: str, path: Path, device: str | None = None, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name, self.path = name, str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.tokenizer.eos_token_id or 0)
        self.eos_ids = _eos_ids(self.tokenizer, getattr(self.model, "generation_config", None))

    def logprob_rows(self, seqs: Sequence[Sequence[int]], positions: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Right-padded batch forward; returns float32 [len(positions[i]), V] log-softmax rows."""
        import torch

        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out = []
            for i, pos in enumerate(positions):
                rows = logits[i, torch.as_tensor(np.asarray(pos) - 1, dtype=torch.long, device=logits.device)]
                out.append(torch.log_softmax(rows.float(), dim=-1).cpu().numpy())
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        import torch

        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding for generation
            ids[i, L - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, L - len(p) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                eos_token_id=list(self.eos_ids) or None,
            )
        return [_cut_eos(row[L:].tolist(), self.eos_ids) for row in out.cpu()]


class OnnxEvalModel:
    kind = "onnx"

    def __init__(self, name: str, path: Path):
        from kdship.runtime.onnx import OnnxCausalLM

        d = path if (path / "kdship_onnx.json").is_file() else path / "onnx"
        self.name, self.path, self.device = name, str(d), "onnxruntime"
        self.rt = OnnxCausalLM(d)
        self.tokenizer = self.rt.tokenizer
        self.vocab_size = int(self.rt.vocab_size)
        self.eos_ids = _eos_ids(self.tokenizer, None)

    def logprob_rows(self, seqs: Sequence[Sequence[int]], positions: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for s, pos in zip(seqs, positions):  # one sequence at a time: no padding subtleties
            ids = np.asarray([list(s)], dtype=np.int64)
            mask = np.ones_like(ids)
            pos_ids = np.arange(ids.shape[1], dtype=np.int64)[None]
            logits, _ = self.rt.forward(ids, mask, pos_ids, self.rt.new_past(1))
            rows = logits[0, np.asarray(pos) - 1].astype(np.float64)
            rows = rows - rows.max(-1, keepdims=True)
            rows = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
            out.append(rows.astype(np.float32))
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        outs = self.rt.generate([list(p) for p in prompts], max_new_tokens=max_new_tokens, temperature=0.0)
        return [_cut_eos(list(o), self.eos_ids) for o in outs]


def _eos_ids(tokenizer, generation_config) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    g = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(g, int):
        ids.add(g)
    elif isinstance(g, (list, tuple)):
        ids.update(int(x) for x in g)
    return ids


def _cut_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens
