"""A plain transformers forward pass as the teacher: the reference, and machines without vLLM.

Row j of a sequence is ``topk(log_softmax(logits[j-1]))`` computed in float32 (the model runs in
float32 on the CPU; on CUDA in the model's dtype, with the log-softmax in float32). ``top_k`` equal
to the vocabulary size returns the whole distribution, sorted (used for exact ``--targets sampled``).
"""

from __future__ import annotations

import numpy as np

from kdship.cache.backends import Generation, TeacherBackend


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(dtype: str, device: str | None = None) -> str:
    """The torch dtype name ``--dtype`` means for this backend on ``device``: auto is float32 on the
    CPU (bf16 is slow there and ~0.07 nat off) and bfloat16 on a GPU; explicit names as given."""
    if dtype != "auto":
        return dtype
    return "float32" if (device or default_device()) == "cpu" else "bfloat16"


class HFBackend(TeacherBackend):
    name = "hf"
    supports_hidden_states = True

    def __init__(self, model_dir: str, device: str | None = None, dtype: str = "auto", max_logit_elems: int = 64 << 20, eos_token_ids: list[int] | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device or default_device()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, compute_dtype(dtype, self.device))).to(self.device).eval()
        self.max_logit_elems = max_logit_elems
        self.eos_token_ids = set(int(e) for e in (eos_token_ids or []))
        self._vocab = int(self.model.get_output_embeddings().weight.shape[0])

    def vocab_size(self) -> int:
        return self._vocab

    def _padded(self, batch: list[list[int]]):
        """Right-padded input ids and attention mask on the device."""
        torch = self.torch
        L = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), L), dtype=torch.long)
        att = torch.zeros((len(batch), L), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.as_tensor(s)
            att[i, : len(s)] = 1
        return ids.to(self.device), att.to(self.device)

    def _logprobs(self, batch: list[list[int]]):
        """[B, Lmax, V] float32 log-softmax for right-padded sequences."""
        ids, att = self._padded(batch)
        with self.torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=att).logits
        return self.torch.log_softmax(logits.float(), dim=-1)

    def hidden_states(self, sequences, layers, max_tokens: int = 16384):
        """The decoder alone (no lm_head), ~``max_tokens`` padded tokens per forward."""
        decoder = getattr(self.model, self.model.base_model_prefix)
        out: list = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and (j - i + 1) * len(sequences[order[j]]) <= max_tokens:
                j += 1
            idx = order[i:j]
            ids, att = self._padded([list(map(int, sequences[t])) for t in idx])
            with self.torch.no_grad():
                hs = decoder(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
            picked = self.torch.stack([hs[layer].float() for layer in layers], 2).cpu().numpy()  # [B, L, layers, H]
            for b, t in enumerate(idx):
                out[t] = picked[b, : len(sequences[t])]
            i = j
        return out

    def score(self, sequences, top_k, with_token_logprobs=False):
        torch = self.torch
        out: list = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        k = min(top_k, self._vocab)
        i = 0
        while i < len(order):
            j = i + 1
            # bound the [B, L, V] float32 log-softmax to ~256 MB (sequences sorted by length)
            while j < len(order) and (j - i + 1) * len(sequences[order[j]]) * self._vocab <= self.max_logit_elems:
                j += 1
            idx = order[i:j]
            lp = self._logprobs([list(map(int, sequences[t])) for t in idx])
            own = None
            if with_token_logprobs:  # logprob of token j at row j: lp[j-1] gathered at token j
                nxt = torch.zeros(lp.shape[:2], dtype=torch.long)
                for b, t in enumerate(idx):
                    nxt[b, : len(sequences[t]) - 1] = torch.as_tensor(list(map(int, sequences[t][1:])))
                own = torch.gather(lp, 2, nxt[..., None].to(lp.device))[..., 0].cpu().numpy()
            vals, tops = torch.topk(lp, k, dim=-1, sorted=True)
            vals, tops = vals.cpu().numpy(), tops.cpu().numpy()
            for b, t in enumerate(idx):
                L = len(sequences[t])
                ids = np.full((L, top_k), -1, np.int32)
                lps = np.full((L, top_k), -np.inf, np.float32)
                ids[1:, :k] = tops[b, : L - 1]
                lps[1:, :k] = vals[b, : L - 1]
                if own is None:
                    out[t] = (ids, lps)
                else:
                    tl = np.full(L, np.nan, np.float32)
                    tl[1:] = own[b, : L - 1]
                    out[t] = (ids, lps, tl)
            i = j
        return out

    def generate(self, prompts, top_k, samples, temperature, top_p, max_new_tokens, seeds):
        """Token-by-token sampling with a KV cache; one ``torch.Generator`` per (prompt, sample)."""
        torch = self.torch
        k = min(top_k, self._vocab)
        res: list[list[Generation]] = []
        for i, p in enumerate(prompts):
            gens = []
            for s in range(samples):
                g = torch.Generator(device="cpu").manual_seed(int(seeds[i]) + s)
                ids = torch.as_tensor([list(map(int, p))], device=self.device)
                past = None
                toks, rows_i, rows_l, own = [], [], [], []
                finish = "length"
                with torch.no_grad():
                    for _ in range(max_new_tokens):
                        out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                        past = out.past_key_values
                        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                        v, t = torch.topk(lp, k)
                        rows_i.append(t.cpu().numpy())
                        rows_l.append(v.cpu().numpy())
                        nxt = _sample(lp.cpu(), temperature, top_p, g)
                        toks.append(nxt)
                        own.append(float(lp[nxt]))
                        if nxt in self.eos_token_ids:
                            finish = "stop"
                            break
                        ids = torch.as_tensor([[nxt]], device=self.device)
                G = len(toks)
                ti = np.full((G, top_k), -1, np.int32)
                tl = np.full((G, top_k), -np.inf, np.float32)
                if G:
                    ti[:, :k] = np.stack(rows_i)
                    tl[:, :k] = np.stack(rows_l)
                gens.append(Generation(toks, ti, tl, finish, np.asarray(own, np.float32)))
            res.append(gens)
        return res


def _sample(logprobs, temperature: float, top_p: float, gen) -> int:
    import torch

    if temperature <= 0:
        return int(torch.argmax(logprobs))
    probs = torch.softmax(logprobs / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
