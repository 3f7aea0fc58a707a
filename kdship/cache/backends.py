"""The teacher backends' common interface: what ``kdship cache`` asks of a teacher.

A backend turns token ids into the teacher's top-k next-token distributions. Rows are aligned the
store's way: row j of a sequence is the distribution over token j given tokens 0..j-1 (row 0 has
no target and holds id -1 / logprob -inf). Logprobs are the raw log-softmax at temperature 1.

Implementations: ``vllm_backend.VLLMBackend`` (default, the real vLLM engine),
``hf_backend.HFBackend`` (plain transformers forward; the reference), and
``openai_backend.OpenAIBackend`` (a teacher behind an OpenAI-compatible URL; black-box KD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Generation:
    """One sampled continuation: its tokens and the teacher's top-k at each generated position.

    ``topk_ids[i]`` / ``topk_logprobs[i]`` is the distribution that token ``token_ids[i]`` was drawn
    from (shape [G, K]); entries the backend could not provide are id -1 / -inf.
    """

    token_ids: list[int]
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    finish_reason: str = "length"
    # [G] the raw teacher logprob of each generated token (None: the backend does not report it)
    token_logprobs: np.ndarray | None = None


class TeacherBackend:
    """Base class. ``k`` is the number of targets per row the backend really returns."""

    name: str = "base"
    # whether ``hidden_states`` works (hint KD): vLLM's and OpenAI's APIs return no hidden states
    supports_hidden_states: bool = False

    def vocab_size(self) -> int:
        raise NotImplementedError

    def score(self, sequences: list[list[int]], top_k: int, with_token_logprobs: bool = False) -> list[tuple]:
        """Teacher-forced top-k for every row of every sequence: ([L, K] int32 ids, [L, K] float32);
        with ``with_token_logprobs`` a third item [L] float32: the logprob of the sequence's own token
        at each row (row 0: NaN), whether or not it is in the top-k."""
        raise NotImplementedError

    def generate(
        self,
        prompts: list[list[int]],
        top_k: int,
        samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seeds: list[int],
    ) -> list[list[Generation]]:
        """``samples`` continuations per prompt; ``seeds[i]`` makes prompt i's draws reproducible."""
        raise NotImplementedError

    def hidden_states(self, sequences: list[list[int]], layers: list[int]) -> list[np.ndarray]:
        """Teacher-forced hidden states: per sequence float32 [L, len(layers), H], position i after
        tokens 0..i; ``layers`` index transformers' ``output_hidden_states`` tuple (0 = embeddings)."""
        raise NotImplementedError(f"the {self.name} backend returns no hidden states")

    def close(self) -> None:
        pass


def pad_topk(ids: list[int], logprobs: list[float], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort one row by logprob descending, keep k, pad with -1 / -inf."""
    order = np.argsort(-np.asarray(logprobs, dtype=np.float64), kind="stable")[:k]
    out_ids = np.full(k, -1, dtype=np.int32)
    out_lp = np.full(k, -np.inf, dtype=np.float32)
    out_ids[: len(order)] = np.asarray(ids, dtype=np.int64)[order]
    out_lp[: len(order)] = np.asarray(logprobs, dtype=np.float64)[order]
    return out_ids, out_lp
