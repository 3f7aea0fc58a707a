"""The residual stream in its principal basis, before width pruning keeps the top hidden channels.

Slicing standard-basis channels keeps what those channels carry; the residual stream of a trained LLM is
strongly correlated across channels, so a basis fitted to it keeps far more of it at the same width
(SliceGPT, arXiv 2401.15024; here one rotation for all layers, so the residual connections stay plain
additions and the student is an ordinary Llama).

``rotate_hidden`` returns the same function (exact up to float rounding) in the rotated basis:

1. every RMSNorm's weight is folded into the linear layers that read its output (q/k/v after
   ``input_layernorm``, gate/up after ``post_attention_layernorm``, lm_head after the final norm) and set
   to 1: an RMSNorm without weight commutes with a rotation (it only divides by the vector's length);
2. Q [H, H]: the eigenvectors of the covariance of the RMS-normalised residual states that the norms read
   (every layer's two reads and the final one, each token weighted equally), largest variance first;
3. every weight that writes the residual stream (embeddings, o_proj, down_proj) is rotated by Q^T and
   every weight that reads it (q/k/v, gate/up, lm_head) by Q.

The lm_head is then no longer the embedding matrix (the final norm's weight sits in it), so the model is
untied. Width pruning then keeps the first channels, which carry the most variance.
"""

from __future__ import annotations

import copy
from typing import Any

from kdship.student.depth import model_from_state
from kdship.student.width import _norm_keys

# each layer's norm -> the block and the projections that read its output
_READS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")), "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}


def residual_covariance(model, batches: list[list[int]]):
    """[H, H] float64: mean of x x^T over the RMS-normalised inputs of every RMSNorm, per token and read."""
    import torch

    H = model.config.hidden_size
    cov = torch.zeros(H, H, dtype=torch.float64)
    count = [0]

    def hook(_mod, inputs):
        x = inputs[0].detach().double().reshape(-1, H)
        x = x / x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
        cov.add_(x.T @ x)
        count[0] += x.shape[0]

    hooks = [m.register_forward_pre_hook(hook) for m in _norm_keys(model)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return cov / max(count[0], 1)


def rotate_hidden(model, batches: list[list[int]]) -> tuple[Any, dict[str, Any]]:
    """(the same model in the principal basis of its residual stream, a summary); see the module docstring."""
    import torch

    cov = residual_covariance(model, batches)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    Q, evals = evecs[:, order], evals[order].clamp(min=0)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    out: dict[str, Any] = {}
    n_layers = model.config.num_hidden_layers
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for norm, (sub, readers) in _READS.items():
            w = sd[p + f"{norm}.weight"]
            for proj in readers:
                out[p + f"{sub}.{proj}.weight"] = (sd[p + f"{sub}.{proj}.weight"] * w[None, :]) @ Q
            out[p + f"{norm}.weight"] = torch.ones_like(w)
        for sub, proj in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            out[p + f"{sub}.{proj}.weight"] = Q.T @ sd[p + f"{sub}.{proj}.weight"]
            if p + f"{sub}.{proj}.bias" in sd:
                out[p + f"{sub}.{proj}.bias"] = Q.T @ sd[p + f"{sub}.{proj}.bias"]
    emb = sd["model.embed_tokens.weight"]
    lm = sd.get("lm_head.weight", emb)
    out["model.embed_tokens.weight"] = emb @ Q
    out["lm_head.weight"] = (lm * sd["model.norm.weight"][None, :]) @ Q
    out["model.norm.weight"] = torch.ones_like(sd["model.norm.weight"])
    state = {k: out.get(k, v).to(torch.float32) for k, v in sd.items()}
    state["lm_head.weight"] = out["lm_head.weight"].to(torch.float32)
    cfg = copy.deepcopy(model.config)
    cfg.tie_word_embeddings = False
    share = (evals.cumsum(0) / evals.sum()).tolist() if evals.sum() > 0 else [1.0] * len(evals)
    info = {"basis": "pca", "variance_share_by_width": {w: round(share[w - 1], 5) for w in (64, 128, 192, 256, 320, 384, 448, 512) if w <= len(share)}}
    return model_from_state(type(model), cfg, state, "hidden rotation"), info

