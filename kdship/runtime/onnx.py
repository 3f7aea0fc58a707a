"""Run an exported ONNX decoder (``OUT/onnx/``) with ONNX Runtime: prefill and incremental decoding.

The graph written by ``kdship export --format onnx`` (see ``kdship/export/onnx.py``) has

    inputs   input_ids        int64   [batch, seq]
             attention_mask   int64   [batch, total_seq]      total_seq = past_seq + seq, 0 = padding
             position_ids     int64   [batch, seq]
             past_key_values.{i}.key / .value   float32 [batch, kv_heads, past_seq, head_dim]
    outputs  logits           float32 [batch, seq, vocab]
             present.{i}.key / .value           float32 [batch, kv_heads, past_seq + seq, head_dim]

Prefill is the same graph with an empty past (``past_seq = 0``). Batches are left-padded: the
mask marks padding with 0 and position ids are ``cumsum(mask) - 1`` so each row counts from its own
first real token (exactly what transformers does for a left-padded batch).

Everything the runtime needs lies in the one folder: ``kdship_onnx.json`` (shapes and names),
``model.onnx`` / ``model.int8.onnx`` and the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

META_FILE = "kdship_onnx.json"


class OnnxModelError(RuntimeError):
    """An ONNX export folder that cannot be used; the message names the folder and the file."""


def position_ids_from_mask(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last ``seq`` positions of a left-padded mask [b, total] -> int64 [b, seq].

    ``pos = cumsum(mask) - 1``, clipped at 0 for padding positions (their value does not matter:
    they are masked out of every attention row).
    """
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.clip(pos, 0, None)[:, -seq:].astype(np.int64)


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits [b, V]: greedy when temperature == 0,
    else softmax(logits / temperature) restricted to the smallest top-p nucleus."""
    if temperature <= 0.0:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    out = np.empty(len(p), dtype=np.int64)
    for r in range(len(p)):
        pr = p[r]
        if top_p < 1.0:
            order = np.argsort(-pr)
            cum = np.cumsum(pr[order])
            keep = order[: int(np.searchsorted(cum, top_p) + 1)]
            q = pr[keep] / pr[keep].sum()
            out[r] = keep[rng.choice(len(keep), p=q)]
        else:
            out[r] = rng.choice(len(pr), p=pr)
    return out


def available_providers() -> list[str]:
    """CUDA first when ONNX Runtime has it (onnxruntime-gpu), always the CPU as fallback."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxCausalLM:
    """A causal LM backed by an ONNX Runtime session over a kdship ONNX export folder.

    Attributes: ``tokenizer`` (transformers tokenizer from the folder), ``vocab_size``,
    ``num_layers``, ``num_kv_heads``, ``head_dim``, ``max_length`` (max positions),
    ``eos_token_ids`` (set), ``pad_token_id``, ``meta`` (the parsed kdship_onnx.json),
    ``model_path``, ``providers`` (the session's execution providers).
    """

    def __init__(self, onnx_dir: str | Path, int8: bool = False, providers: Sequence[str] | None = None, num_threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        self.onnx_dir = Path(onnx_dir)
        meta_path = self.onnx_dir / META_FILE
        if not self.onnx_dir.is_dir():
            raise OnnxModelError(f"ONNX export folder not found: {self.onnx_dir}")
        if not meta_path.is_file():
            raise OnnxModelError(f"{meta_path}: missing; is {self.onnx_dir} a `kdship export --format onnx` folder (OUT/onnx)?")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise OnnxModelError(f"{meta_path}: not valid JSON: {e}") from e
        files = self.meta.get("files", {})
        key = "int8" if int8 else "fp32"
        fname = files.get(key)
        if not fname:
            hint = " (export with --quantize int8)" if int8 else ""
            raise OnnxModelError(f"{meta_path}: no '{key}' model listed under 'files'{hint}")
        self.model_path = self.onnx_dir / fname
        if not self.model_path.is_file():
            raise OnnxModelError(f"{self.model_path}: listed in {META_FILE} but missing")

        self.num_layers = int(self.meta["num_layers"])
        self.num_kv_heads = int(self.meta["num_kv_heads"])
        self.head_dim = int(self.meta["head_dim"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.max_length = int(self.meta.get("max_position_embeddings") or 1 << 30)
        self.input_names: list[str] = list(self.meta["input_names"])
        self.output_names: list[str] = list(self.meta["output_names"])
        self.past_names: list[str] = list(self.meta["past_names"])
        self.present_names: list[str] = list(self.meta["present_names"])
        self.kv_dtype = np.dtype(self.meta.get("dtype", "float32"))
        eos = self.meta.get("eos_token_id")
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        self.pad_token_id = self.meta.get("pad_token_id")

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if num_threads:
            so.intra_op_num_threads = int(num_threads)
        if not spin:  # idle worker threads sleep instead of busy-waiting: slower per call, kinder to shared CPUs
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=list(providers or available_providers()))
        self.providers = self.session.get_providers()
        got = [i.name for i in self.session.get_inputs()]
        if got != self.input_names:
            raise OnnxModelError(f"{self.model_path}: graph inputs {got} differ from {META_FILE} {self.input_names}")

        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.onnx_dir))
        except Exception as e:  # noqa: BLE001 - re-raised with the folder named
            raise OnnxModelError(f"{self.onnx_dir}: cannot load the tokenizer files: {e}") from e
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # -- low level -----------------------------------------------------------------------------
    def new_past(self, batch: int) -> list[np.ndarray]:
        """An empty KV cache for ``batch`` rows: 2 * num_layers arrays [batch, kv_heads, 0, head_dim]."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step: logits [b, s, V] float32 and the present cache (past with the s new positions).

        ``attention_mask`` covers past and new positions: [b, past_seq + s].
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be 2-D [batch, seq], got shape {input_ids.shape}")
        b, s = input_ids.shape
        if len(past) != len(self.past_names):
            raise ValueError(f"past must hold {len(self.past_names)} arrays (2 per layer), got {len(past)}")
        p = past[0].shape[2]
        for name, a in zip(self.past_names, past):
            if a.shape != (b, self.num_kv_heads, p, self.head_dim):
                raise ValueError(f"{name}: expected shape {(b, self.num_kv_heads, p, self.head_dim)}, got {a.shape}")
        if attention_mask.shape != (b, p + s):
            raise ValueError(f"attention_mask must be [batch, past_seq + seq] = {(b, p + s)}, got {attention_mask.shape}")
        if position_ids.shape != (b, s):
            raise ValueError(f"position_ids must be [batch, seq] = {(b, s)}, got {position_ids.shape}")
        if s and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids out of range [0, {self.vocab_size})")
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update({n: np.ascontiguousarray(a, dtype=self.kv_dtype) for n, a in zip(self.past_names, past)})
        outs = self.session.run(self.output_names, feed)
        return outs[0], list(outs[1:])

    # -- generation ----------------------------------------------------------------------------
    def left_pad(self, prompt_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad prompts -> (input_ids [b, L] int64, attention_mask [b, L] int64)."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        L = max(len(p) for p in prompt_ids)
        ids = np.full((len(prompt_ids), L), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(prompt_ids), L), dtype=np.int64)
        for r, p in enumerate(prompt_ids):
            ids[r, L - len(p) :] = p
            mask[r, L - len(p) :] = 1
        return ids, mask

    def stream(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> Iterator[list[int | None]]:
        """Yield one list per decoding step: the new token of each row, or None once a row finished.

        A row finishes after emitting a stop token (default: the model's EOS ids; the stop token is
        yielded) or after ``max_new_tokens`` tokens. Raises ValueError when a prompt plus
        ``max_new_tokens`` exceeds ``max_length``.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        longest = max((len(p) for p in prompt_ids), default=0)
        if longest + max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's {self.max_length} positions")
        stops = set(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        rng = np.random.default_rng(seed)
        ids, mask = self.left_pad(prompt_ids)
        b = len(prompt_ids)
        past = self.new_past(b)
        done = np.zeros(b, dtype=bool)
        step_ids, step_pos = ids, position_ids_from_mask(mask, ids.shape[1])
        for _ in range(max_new_tokens):
            logits, past = self.forward(step_ids, mask, step_pos, past)
            nxt = sample_next(logits[:, -1, :], temperature, top_p, rng)
            nxt = np.where(done, self.pad_token_id, nxt)
            yield [None if done[r] else int(nxt[r]) for r in range(b)]
            done |= np.isin(nxt, list(stops)) if stops else False
            if done.all():
                return
            # Finished rows keep decoding pad tokens (masked as 1 so shapes stay rectangular; their
            # output is discarded): cheaper than reshaping the cache per row.
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            step_ids = nxt[:, None]
            step_pos = (mask.sum(-1, keepdims=True) - 1).astype(np.int64)

    def generate(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Generate for a left-padded batch; returns the new tokens of each row (a stop token that
        ended a row is included as its last token)."""
        out: list[list[int]] = [[] for _ in prompt_ids]
        for step in self.stream(prompt_ids, max_new_tokens, temperature, top_p, seed, stop_token_ids):
            for r, t in enumerate(step):
                if t is not None:
                    out[r].append(t)
        return out
