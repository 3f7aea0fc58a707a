"""Incremental detokenisation: the text of a growing token sequence, one piece per token, in O(1) per step.

Decoding all generated tokens at every step is quadratic in the output length. Here each step decodes
only a short window: the tokens of the last emitted piece (``prefix``) plus those not emitted yet.
The new text is the window's text minus the prefix's text. Keeping the previous piece in the window
lets tokenizers whose decoding depends on the neighbour (SentencePiece's leading space, clean-up of
spaces before punctuation) produce the same characters as decoding everything at once.

A window whose text ends in U+FFFD may be an incomplete multi-byte UTF-8 character (byte-level BPE
splits characters across tokens): nothing is emitted until a later token completes it, or
:meth:`IncrementalDetokenizer.flush` at the end emits it as it is. So every emitted piece is final,
and the pieces joined equal ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """``push(token_id) -> new final text`` (possibly ""), ``flush() -> the rest`` at the end."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: the first token of the last emitted piece
        self.read_offset = 0  # tokens before this are emitted
        self.decoded_tokens = 0  # tokens passed to decode so far (the cost; linear in the output)

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _window_delta(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        return window[len(prefix) :] if len(window) > len(prefix) else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        delta = self._window_delta()
        if not delta or delta.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet (a special token), or a character still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """The text of the tokens not emitted yet, incomplete characters included (as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        delta = self._window_delta()
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta
