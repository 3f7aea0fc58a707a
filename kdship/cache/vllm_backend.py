"""The real vLLM engine as a teacher backend.

Settings that matter for distillation targets (each a known pitfall other tools hit):

* ``logprobs_mode="raw_logprobs"``: the teacher's log-softmax at temperature 1, whatever the
  sampling temperature of generated text.
* ``max_logprobs`` raised to at least the requested k (vLLM's default cap is 20 and a larger
  request fails).
* ``enable_prefix_caching=False``: prompt blocks served from the prefix cache are not recomputed,
  so their prompt logprobs can come back missing.
* ``flat_logprobs=True``: one flat list per request instead of a Python dict per position.
  Each position then holds the *actual* token first (with its true rank, possibly > k), followed
  by the k top entries; the first entry is dropped here, so a target row is exactly the top-k even
  when the actual token lies outside it.
* ``skip_tokenizer_init=True``: kdship tokenises itself and passes token ids, so vLLM does not
  detokenise every logprob entry (pure overhead for a cache). EOS is passed as ``stop_token_ids``.

The engine itself (one per process and settings) comes from ``kdship.runtime.vllm_engine``.
"""

from __future__ import annotations

import numpy as np

from kdship.cache.backends import Generation, TeacherBackend
from kdship.runtime.vllm_engine import DEFAULT_MAX_LOGPROBS, get_engine

def _own_from_flat(flat, tokens, n_rows: int) -> np.ndarray:
    """[n_rows] logprob of each position's own (actual) token: the first entry of every non-empty
    position in flat mode, the token's dict entry otherwise; NaN where there is none. Flat mode reads
    only those first entries from vLLM's Python lists (converting all K' + 1 a position would cost as much
    as the rows themselves)."""
    out = np.full(n_rows, np.nan, np.float32)
    if hasattr(flat, "start_indices"):
        starts = np.asarray(flat.start_indices[:n_rows], np.int64)
        ends = np.asarray(flat.end_indices[:n_rows], np.int64)
        full = np.flatnonzero(ends > starts)
        first = starts[full].tolist()
        tok = np.fromiter((flat.token_ids[i] for i in first), np.int64, len(first))
        lp = np.fromiter((flat.logprobs[i] for i in first), np.float64, len(first))
        ok = tok == np.asarray(tokens, np.int64)[full]
        out[full[ok]] = lp[ok]
        return out
    for j, pos in enumerate(flat[:n_rows]):
        if pos and int(tokens[j]) in pos:
            out[j] = pos[int(tokens[j])].logprob
    return out


def _rows_from_flat(flat, k: int, n_rows: int, skip_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """FlatLogprobs (or list of dicts) -> ([n_rows, k] ids, [n_rows, k] logprobs), sorted descending.

    Each non-empty position holds [actual token, top-1, ..., top-k] in flat mode; the actual token is
    dropped, which also handles it lying outside the top-k (the "extra entry" pitfall).
    """
    ids = np.full((n_rows, k), -1, np.int32)
    lps = np.full((n_rows, k), -np.inf, np.float32)
    if hasattr(flat, "start_indices"):
        starts = np.asarray(flat.start_indices[:n_rows], np.int64)
        lens = np.asarray(flat.end_indices[:n_rows], np.int64) - starts
        full = lens > 0
        width = k + 1 if skip_first else k
        if full.any() and (lens[full] == width).all():
            # fast path (the usual case): every scored position holds [actual, top-1..top-k] in rank order,
            # back to back in the flat lists: one conversion of that span, a reshape, no index per entry
            rows = np.flatnonzero(full)
            a, b = int(starts[rows[0]]), int(starts[rows[-1]]) + width
            if b - a == len(rows) * width and (np.diff(starts[rows]) == width).all():
                ids[rows] = np.asarray(flat.token_ids[a:b], np.int64).reshape(-1, width)[:, width - k:]
                lps[rows] = np.asarray(flat.logprobs[a:b], np.float64).reshape(-1, width)[:, width - k:]
                return ids, lps
            sel = (starts[full][:, None] + np.arange(width - k, width)[None, :]).reshape(-1)
            ids[rows] = np.asarray(flat.token_ids, np.int64)[sel].reshape(-1, k)
            lps[rows] = np.asarray(flat.logprobs, np.float64)[sel].reshape(-1, k)
            return ids, lps
        tok = np.asarray(flat.token_ids, np.int64)
        lp = np.asarray(flat.logprobs, np.float64)
        ranks = np.asarray([r if r is not None else 0 for r in flat.ranks], np.int64)
        starts, ends = flat.start_indices, flat.end_indices
        for j in range(min(n_rows, len(starts))):
            a, b = starts[j], ends[j]
            if b <= a:
                continue
            if skip_first:
                a += 1
            row_ids, row_lp, row_rank = tok[a:b], lp[a:b], ranks[a:b]
            order = np.argsort(row_rank, kind="stable")[:k]
            m = len(order)
            ids[j, :m] = row_ids[order]
            lps[j, :m] = row_lp[order]
        return ids, lps
    for j, pos in enumerate(flat[:n_rows]):
        if not pos:
            continue
        items = sorted(((v.rank if v.rank is not None else 1 << 30), t, v.logprob) for t, v in pos.items())
        items = [it for it in items if it[0] <= k][:k]  # drops the actual token when its rank > k
        ids[j, : len(items)] = [t for _, t, _ in items]
        lps[j, : len(items)] = [lp for _, _, lp in items]
    return ids, lps


class VLLMBackend(TeacherBackend):
    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        max_logprobs: int = DEFAULT_MAX_LOGPROBS,
        dtype: str = "auto",
        eos_token_ids: list[int] | None = None,
        flat_logprobs: bool = True,
    ):
        self.model_dir = str(model_dir)
        self.max_logprobs = max_logprobs
        self.llm = get_engine(self.model_dir, max_model_len=max_model_len, max_logprobs=max_logprobs, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
        self.eos_token_ids = [int(e) for e in (eos_token_ids or [])]
        self.flat_logprobs = flat_logprobs
        self._vocab = int(self.llm.llm_engine.model_config.get_vocab_size())

    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def _check_k(self, k: int) -> None:
        if k > self.max_logprobs:
            raise ValueError(f"top-k {k} exceeds the engine's max_logprobs {self.max_logprobs}")

    def score(self, sequences, top_k, with_token_logprobs=False):
        from vllm import SamplingParams, TokensPrompt

        self._check_k(top_k)
        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, flat_logprobs=self.flat_logprobs, temperature=0.0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s))) for s in sequences], params, use_tqdm=False)
        res = []
        for seq, out in zip(sequences, outs):
            plp = out.prompt_logprobs
            if plp is None or len(plp) != len(seq):
                raise RuntimeError(f"vLLM returned {None if plp is None else len(plp)} prompt-logprob rows for a {len(seq)}-token prompt")
            ids, lps = _rows_from_flat(plp, top_k, len(seq), skip_first=True)
            if len(seq) > 1 and (ids[1:, 0] < 0).any():
                raise RuntimeError("vLLM returned a position without prompt logprobs (is prefix caching on?)")
            res.append((ids, lps, _own_from_flat(plp, seq, len(seq))) if with_token_logprobs else (ids, lps))
        return res

    def generate(self, prompts, top_k, samples, temperature, top_p, max_new_tokens, seeds):
        from vllm import SamplingParams, TokensPrompt

        self._check_k(top_k)
        reqs, params = [], []
        for i, p in enumerate(prompts):
            for s in range(samples):
                reqs.append(TokensPrompt(prompt_token_ids=list(map(int, p))))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_new_tokens,
                        seed=int(seeds[i]) + s,
                        logprobs=top_k,
                        flat_logprobs=self.flat_logprobs,
                        stop_token_ids=self.eos_token_ids or None,
                        detokenize=False,
                    )
                )
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        res: list[list[Generation]] = [[] for _ in prompts]
        for r, out in enumerate(outs):
            c = out.outputs[0]
            toks = list(c.token_ids)
            ids, lps = _rows_from_flat(c.logprobs, top_k, len(toks), skip_first=True)
            own = _own_from_flat(c.logprobs, toks, len(toks)) if toks else np.zeros(0, np.float32)
            res[r // samples].append(Generation(toks, ids, lps, c.finish_reason or "length", own))
        return res
