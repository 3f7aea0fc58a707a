"""Distillation losses from stored teacher targets, with a chunked, fused lm_head.

One interface (torchtune ``kd_losses`` style): a ``DistillLoss`` built from a ``LossConfig`` takes the
student's final hidden states at the trained positions, the lm_head weight and the batch's stored
targets, and returns a scalar loss plus its parts. Everything below works on *rows*: one row is one
trained position (a store row j >= 1 with ``loss_mask[j]``), paired with the student's output at
position j-1.

Notation (per row; p = teacher, q = student; K stored ids per row, V the student's vocabulary)::

    z      = h W^T / T                      student logits at temperature T          [N, V]
    log q  = z - logsumexp(z)               full-vocabulary student log-probs        (never [N, V] at once)
    s_i    = log q[id_i]                    gathered at the stored ids               [N, K]
    t_i    = stored teacher logprob         raw log-softmax at T = 1                 [N, K]

Divergences (sums over the categories c of the chosen support)::

    fkl   KL(p||q)        = sum_c p_c (log p_c - log q_c)
    rkl   KL(q||p)        = sum_c q_c (log q_c - log p_c)
    jsd   JSD_beta(p, q)  = beta KL(p||m) + (1-beta) KL(q||m),  m = beta p + (1-beta) q   (0 < beta < 1)
    skl   SKL_alpha(p, q) = KL(p || alpha p + (1-alpha) q)                              (DistiLLM)
    srkl  SRKL_alpha(p,q) = KL(q || alpha q + (1-alpha) p)                              (DistiLLM)
    tvd   TVD(p, q)       = 1/2 sum_c |p_c - q_c|
    sft   no divergence: cross-entropy on the data tokens only (sequence-level KD on ``generate`` stores)

The support (``tail``) for top-k stores::

    renorm   categories = the K stored ids; p and q both renormalised over them:
             p_c = softmax(t / T)_c,  q_c = softmax(s)_c  (s already at temperature T)
    bucket   categories = the K stored ids + one "rest" category holding everything else:
             p_rest = 1 - sum_i exp(t_i),  q_rest = 1 - sum_i exp(s_i)
             (T != 1 tempers p over the K+1 categories as if "rest" were one token: an approximation)
             A row whose ids cover the whole tokenizer vocabulary, or whose teacher rest mass is below
             1e-6 (rounding), has no rest category: with k = vocab both tails equal full-vocabulary KD.

Weighted sparse targets (stores with ``targets`` "headtail" -- the default -- or "sampled"): every
divergence above is a sum over the vocabulary of per-token terms, D = sum_v term_v(p_v, q_v). A row
carries entries (id_i, t_i = log p_i, w_i) with E[sum_i w_i f(id_i) / p_i] = sum_v p_v f(v) for any f,
so sum_i (w_i / p_i) term_i is an unbiased estimate of D, and its gradient of D's gradient::

    headtail   exact entries (top-h head, data token): w_i = p_i        -> their terms exactly
               residual draws x_n (N of them, R = exact rest mass, B = the part of R beyond the
               backend's candidates, never drawn): w = (R - B) * count / N
               + one "beyond" bucket when the weights sum to 1 - B < 1 - BUCKET_EPS:
               p_beyond = B, q_beyond = 1 - sum_i q(id_i)  (the student's mass off the stored ids;
               exact for --backend hf, where B = 0 and there is no bucket)
    sampled    N draws from p: w_i = count_i / N   (arXiv 2503.16870)

(variance grows for rkl where q >> p on tokens never drawn). T must be 1.

The draws' estimator (``LossConfig.draw_estimator``)::

    is   the plain importance-sampled sum above: sum over E exactly + sum_n (w_n / p_n) term_n
    cv   the same with the student's own tail as a control variate. Let Q = 1 - sum_{v in E} q_v (the
         student's mass off the exact entries) and a_v = sg(R q_v / Q) (the teacher's tail shaped like
         the student's, detached). Every divergence here is a sum of per-token terms phi(p_v, q_v) with phi
         homogeneous of degree 1, so sum_{v not in E} phi(a_v, q_v) = phi(R, Q) exactly (the bucket), value
         and gradient; the draws then only estimate the difference:

             D ~= sum_{E} phi(p_v, q_v) + phi(R, Q) + sum_n (w_n / p_n) [phi(p_n, q_n) - phi(a_n, q_n)]

         unbiased for the value and the gradient like ``is`` (the draws do not depend on the student),
         and its noise vanishes as the student's tail approaches the teacher's: at q = p every
         correction is 0 and its gradient too. With fixed draws over several epochs, ``is`` pulls a
         drawn token toward R * count / N and an undrawn one toward 0; ``cv`` pulls a drawn token
         toward its exact p and leaves an undrawn one's share to the rest of the model.
         vLLM stores: the mass B beyond the candidates is inside R (the bucket) but never drawn, so
         those tokens keep the student's shape (a_v) rather than the teacher's; exact with --backend hf.
         Far from the teacher its noise is *larger* than ``is``'s (a drawn token the student
         over-weights gets a large push down); on SmolLM2 it trained worse students (docs/train.md),
         so ``is`` is the default and ``cv`` is experimental.

Total loss, averaged over rows (``average="token"``) or over sequences of length-normalised row means
(``average="sequence"``); the batch's row weights carry this (see ``loader.Batch.row_weight``)::

    loss = sum_rows row_weight * ((1 - ce_weight) * D_row + ce_weight * CE_row),
    CE_row = -log q_{T=1}[data token]

Full-distribution targets (online KD, ``kdship train --online-teacher``): ``topk_ids`` is None and
``topk_logprobs`` holds the teacher's whole log-softmax [N, V'] over the first V' ids (the
tokenizer's); every row is then complete (no rest category) and the loss is full-vocabulary KD. The
ids 0..V'-1 are implied, never materialised ([N, V'] int64 would be 8 bytes per logit).

No [N, V] float32 tensor is ever held: ``fused_head_loss`` computes logits ``chunk_rows`` rows at a
time, takes the logsumexp and the gathers, evaluates the row losses on the small [c, K] tensors and
computes the gradient with respect to that chunk's logits right away (the row losses depend on one row
each), so the lm_head's backward is done inside the forward, as in fused linear cross-entropy kernels:
one logits matmul and two gradient matmuls per chunk, no recomputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# teacher "rest" mass below REST_EPS is rounding, not a category: one threshold for train, export, eval
from kdship.divergence import REST_EPS

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "sft")
TAILS = ("bucket", "renorm")
DRAW_ESTIMATORS = ("is", "cv")
AVERAGES = ("token", "sequence")
# weighted rows (headtail) sum to 1 within the store's encoding error (<= 1e-3, cache/FORMAT.md); a
# shortfall beyond this is a real "beyond" mass (vLLM's candidates missed it), not rounding
BUCKET_EPS = 2e-3


@dataclass
class LossConfig:
    kind: str = "fkl"
    tail: str = "bucket"
    temperature: float = 1.0
    ce_weight: float = 0.0
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skl / srkl
    chunk_rows: int | None = None  # rows per lm_head chunk; None = LOGIT_BUDGET logits for the device (8M on the CPU, 64M on CUDA)
    # headtail "beyond" bucket: 0 = against the student's mass off the row's stored ids; K' > 0 =
    # against its mass outside its own top-K' (and the stored ids), the student's estimate of the
    # teacher's never-drawn set. Off the stored ids, undrawn mid-tail tokens share the bucket's push.
    beyond_topk: int = 0
    # how sparse draws (headtail / sampled stores) estimate the tail: "is" (importance-sampled sum) or
    # "cv" (experimental: the student's tail as a control variate); see the module docstring
    draw_estimator: str = "is"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--loss {self.kind!r}: unknown; choose one of {', '.join(KINDS)}")
        if self.tail not in TAILS:
            raise ValueError(f"--tail {self.tail!r}: unknown; choose one of {', '.join(TAILS)}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"--ce-weight must be in [0, 1], got {self.ce_weight}")
        if self.draw_estimator not in DRAW_ESTIMATORS:
            raise ValueError(f"--draw-estimator {self.draw_estimator!r}: unknown; choose one of {', '.join(DRAW_ESTIMATORS)}")
        if self.draw_estimator == "cv" and self.beyond_topk:
            raise ValueError("--beyond-topk applies to --draw-estimator is (cv puts the beyond mass in its tail bucket)")
        if self.kind == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"--beta must be in (0, 1) for jsd, got {self.beta}")
        if self.kind in ("skl", "srkl") and not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"--alpha must be in [0, 1) for {self.kind}, got {self.alpha}")


# --------------------------------------------------------------------------------------------------
# Divergences as per-category terms


def _kl_terms(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """a_c (log a_c - log b_c), 0 where a_c = 0. la, lb: log-probs [..., C]."""
    a = la.exp()
    return torch.where(a > 0, a * (la - lb), torch.zeros_like(a))


def divergence_terms(kind: str, lp: torch.Tensor, lq: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-category terms [..., C] whose sum over C is the divergence D(p, q) named by ``kind``.

    lp: teacher log-probs [..., C]; lq: student log-probs [..., C]; both finite (callers sanitise
    invalid categories to a finite value and zero their terms afterwards).
    """
    if kind == "fkl":
        return _kl_terms(lp, lq)
    if kind == "rkl":
        return _kl_terms(lq, lp)
    if kind == "jsd":
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        return beta * _kl_terms(lp, lm) + (1 - beta) * _kl_terms(lq, lm)
    if kind == "skl":
        lm = lq if alpha == 0 else torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha))
        return _kl_terms(lp, lm)
    if kind == "srkl":
        lm = lp if alpha == 0 else torch.logaddexp(lq + math.log(alpha), lp + math.log1p(-alpha))
        return _kl_terms(lq, lm)
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs()
    raise ValueError(f"no divergence for loss kind {kind!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    x = x.clamp(max=-1e-7)
    return torch.where(x < -math.log(2.0), torch.log1p(-x.exp()), torch.log(-torch.expm1(x)))


def _log_mass_outside(s: torch.Tensor, inside: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[N] log(1 - sum_{inside} exp(s)): the student's log mass off the ``inside`` entries ([N, K] bool)
    on the ``rows`` that have such a category, 0 elsewhere (where-guarded, so no NaN gradient leaks)."""
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s_in = torch.logsumexp(torch.where(inside, s, torch.finfo(s.dtype).min / 4), -1)
    return torch.where(rows, _log1mexp(torch.where(rows, s_in, -1.0)), zero)


def kd_row_losses(
    cfg: LossConfig,
    s_lp: torch.Tensor,
    t_lp: torch.Tensor,
    valid: torch.Tensor,
    target_weights: torch.Tensor | None = None,
    vocab_size: int | None = None,
    s_far: torch.Tensor | None = None,
    target_drawn: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence per row [N] from student log-probs at the stored ids.

    s_lp: [N, K] student log-probs at the stored ids, normalised over the full vocabulary at
          temperature T (float32). t_lp: [N, K] stored teacher logprobs (T = 1). valid: [N, K] bool
          (id != -1 and t_lp finite). target_weights: [N, K] w_i = count/N for sampled stores, else None.
    target_drawn: [N, K] bool, the entries that are draws (with target_weights; needed by ``draw_estimator="cv"``).
    vocab_size: the tokenizer's vocabulary; rows with that many valid ids are complete (no rest).
    Rows with no valid entry give 0; gradients stay finite (invalid entries are replaced before use).
    """
    T = float(cfg.temperature)
    zero = torch.zeros((), dtype=s_lp.dtype, device=s_lp.device)
    has_any = valid.any(-1)
    neg = torch.finfo(s_lp.dtype).min / 4
    s_safe = torch.where(valid, s_lp, zero)
    t_safe = torch.where(valid, t_lp, zero)

    if target_weights is not None:  # sampled / headtail: D ~= sum_i w_i term_i / p_i on the full vocabulary
        if T != 1.0:
            raise ValueError("sampled / headtail targets were drawn at temperature 1; --temperature must be 1 with them")
        terms = divergence_terms(cfg.kind, t_safe, s_safe, cfg.beta, cfg.alpha)
        w = target_weights.to(s_lp.dtype)
        use = valid & (w > 0)
        # w_i / p_i in log space: exact entries have w_i = p_i (ratio 1) even where p_i underflows
        ratio = torch.where(use, torch.exp(torch.log(torch.where(use, w, 1.0)) - t_safe), zero)
        if cfg.draw_estimator == "cv":
            if target_drawn is None:  # never fall back to "is" silently
                raise ValueError("draw_estimator cv: the rows do not say which entries are draws (StoreLoader(..., with_drawn=True))")
            return _cv_row_losses(cfg, terms, ratio, s_safe, w, use, target_drawn, has_any)
        out = (ratio * terms).sum(-1)
        # weights summing to 1 - B < 1: the teacher's mass B beyond everything the backend could draw
        # is one "beyond" bucket against the student's mass outside the row's stored ids
        b = 1.0 - torch.where(use, w, zero).double().sum(-1)
        bucket = has_any & (b > BUCKET_EPS)
        t_b = torch.where(bucket, b.clamp(min=BUCKET_EPS).log(), 0.0).to(s_lp.dtype)
        if s_far is None:  # the student's mass off the stored ids
            s_b = _log_mass_outside(s_safe, valid, bucket)
        else:  # its mass outside its own top-K' and the stored ids (LossConfig.beyond_topk)
            s_b = torch.where(bucket, s_far.to(s_lp.dtype), zero)
        b_term = divergence_terms(cfg.kind, t_b[:, None], s_b[:, None], cfg.beta, cfg.alpha)[:, 0]
        return out + torch.where(bucket, b_term, zero)

    if cfg.tail == "renorm":
        lp = torch.log_softmax(torch.where(valid, t_safe / T, neg), -1)
        lq = torch.log_softmax(torch.where(valid, s_safe, neg), -1)
        lp, lq = torch.where(valid, lp, zero), torch.where(valid, lq, zero)
        terms = divergence_terms(cfg.kind, lp, lq, cfg.beta, cfg.alpha)
        out = torch.where(valid, terms, zero).sum(-1)
        return torch.where(has_any, out, zero)

    # bucket: K stored ids + one "rest" category
    t_in = torch.logsumexp(torch.where(valid, t_safe.double(), -math.inf), -1)  # log mass inside (fp64: rounding)
    t_rest_mass = (-torch.expm1(t_in)).clamp(min=0)
    complete = valid.sum(-1) >= vocab_size if vocab_size else torch.zeros_like(has_any)
    rest_valid = has_any & ~complete & (t_rest_mass > REST_EPS)
    t_rest = torch.where(rest_valid, t_rest_mass.clamp(min=REST_EPS).log(), 0.0).to(s_lp.dtype)
    s_rest = _log_mass_outside(s_safe, valid, rest_valid)
    lp = torch.cat([t_safe, t_rest[:, None]], -1)
    lq = torch.cat([s_safe, s_rest[:, None]], -1)
    cat_valid = torch.cat([valid, rest_valid[:, None]], -1)
    if T != 1.0:  # temper the teacher over the K+1 categories
        lp = torch.log_softmax(torch.where(cat_valid, lp / T, neg), -1)
        lp = torch.where(cat_valid, lp, zero)
    terms = divergence_terms(cfg.kind, lp, lq, cfg.beta, cfg.alpha)
    out = torch.where(cat_valid, terms, zero).sum(-1)
    return torch.where(has_any, out, zero)


def _cv_row_losses(cfg: LossConfig, terms: torch.Tensor, ratio: torch.Tensor, s: torch.Tensor, w: torch.Tensor, use: torch.Tensor,
                   drawn: torch.Tensor, has_any: torch.Tensor) -> torch.Tensor:
    """Weighted sparse targets with the student's tail as a control variate (``draw_estimator="cv"``, module doc).

    terms: [N, K] phi(p_i, q_i); ratio: [N, K] w_i / p_i; s: [N, K] student log-probs (finite);
    w: [N, K] weights; use: [N, K] valid entries with w > 0; drawn: [N, K] bool."""
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    exact = use & ~drawn
    draw = use & drawn
    out = torch.where(exact, terms, zero).sum(-1)
    # R: the teacher's mass off the exact entries (fp64: 1 - a sum near 1); Q: the student's
    r_mass = (1.0 - torch.where(exact, w, zero).double().sum(-1)).clamp(min=0.0)
    tail = has_any & (r_mass > REST_EPS)
    log_r = torch.where(tail, r_mass.clamp(min=REST_EPS).log(), 0.0).to(s.dtype)
    log_q = _log_mass_outside(s, exact, tail)
    bucket = divergence_terms(cfg.kind, log_r[:, None], log_q[:, None], cfg.beta, cfg.alpha)[:, 0]
    # a_i = R q_i / Q, detached: the tail's teacher if it were shaped like the student's (<= R)
    log_a = torch.minimum(log_r[:, None] + s - log_q[:, None], log_r[:, None]).detach()
    terms_a = divergence_terms(cfg.kind, log_a, s, cfg.beta, cfg.alpha)
    corr = torch.where(draw, ratio * (terms - terms_a), zero).sum(-1)
    return out + torch.where(tail, bucket + corr, zero)


# --------------------------------------------------------------------------------------------------
# The fused, chunked lm_head


RowFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (s_kd, s_ce, rows, s_far=None) -> (loss, parts)


# logits per lm_head chunk. The CPU: ~8M (32 MB in fp32), where the matmuls dominate. CUDA: ~64M (256 MB),
# because every chunk dispatches a few hundred small kernels (the row losses and their gradients, whatever
# the chunk's size): at 49k vocab and 16k tokens, 8M logits made 96 chunks and the step launch-bound
# (bench/train_profile.py); 64M makes 12, and still holds well under a quarter of the full logits.
LOGIT_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 26}


def default_chunk_rows(vocab: int, device: torch.device | str = "cpu") -> int:
    kind = torch.device(device).type
    return max(16, LOGIT_BUDGET.get(kind, LOGIT_BUDGET["cpu"]) // max(1, vocab))


_MM_OUT_DTYPE = {"cuda": True}  # torch.mm(..., out_dtype=) works there (turned off at the first refusal)


def matmul_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b as an ``acc`` (float32) tensor. Low-precision operands on CUDA: cuBLAS accumulates in fp32 and
    writes fp32 (``out_dtype``), so logits are not rounded to bf16 on the way out (a logit of 20 would
    lose ~0.06); elsewhere the product is upcast after the matmul."""
    if a.dtype == acc:
        return a @ b
    if _MM_OUT_DTYPE.get(a.device.type):
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (TypeError, NotImplementedError, RuntimeError):  # an older torch: no fp32-out bf16 matmul
            _MM_OUT_DTYPE[a.device.type] = False
    return (a @ b).to(acc)


class _FusedHeadLoss(torch.autograd.Function):
    """loss = sum over chunks of row_fn(log q_T[ids], log q_1[target]); gradients computed per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, targets, row_fn, chunk_rows, temperature, needs_grad, n_parts, far_k=0, matmul_dtype=None):  # noqa: D401
        N = hidden.shape[0]
        full = isinstance(ids, int)  # every row's ids are 0..ids-1: slice instead of gather
        mm_dtype = matmul_dtype or hidden.dtype  # the three lm_head matmuls' operands (bf16 under CUDA autocast)
        w_mm = weight.to(mm_dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # logits and gradients in >= fp32 (bf16 matmul, fp32 softmax)
        grad_h = torch.zeros_like(hidden) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        parts = torch.zeros(n_parts, dtype=acc, device=hidden.device)
        T = float(temperature)
        for a in range(0, N, chunk_rows):
            sl = slice(a, min(N, a + chunk_rows))
            h_c = hidden[sl].to(mm_dtype)
            z = matmul_acc(h_c, w_mm.T, acc)  # [c, V], the only vocabulary-sized tensors live per chunk
            lse1 = torch.logsumexp(z, -1, keepdim=True)
            if T == 1.0:
                zT, lseT = z, lse1
            else:
                zT = z / T
                lseT = torch.logsumexp(zT, -1, keepdim=True)
            ids_c = None if full else ids[sl]
            tgt_c = targets[sl, None]
            far_mask = s_far = g_far = None
            if far_k and not full:  # F = outside the student's own top-far_k and the stored ids
                far_mask = torch.ones_like(z, dtype=torch.bool)
                far_mask.scatter_(1, z.topk(min(far_k, z.shape[1]), -1).indices, False)
                far_mask.scatter_(1, ids_c, False)
                s_far = (torch.logsumexp(z.masked_fill(~far_mask, float("-inf")), -1) - lse1.squeeze(1)).clamp(min=-80.0)
            with torch.enable_grad():
                s_kd = ((zT[:, :ids] if full else zT.gather(1, ids_c)) - lseT).detach().requires_grad_(needs_grad)
                s_ce = (z.gather(1, tgt_c) - lse1).squeeze(1).detach().requires_grad_(needs_grad)
                if s_far is not None:
                    s_far = s_far.detach().requires_grad_(needs_grad)
                    loss_c, parts_c = row_fn(s_kd, s_ce, sl, s_far)
                else:
                    loss_c, parts_c = row_fn(s_kd, s_ce, sl)
                if needs_grad and loss_c.requires_grad:
                    leaves = [s_kd, s_ce] + ([s_far] if s_far is not None else [])
                    grads = torch.autograd.grad(loss_c, leaves, allow_unused=True)
                    g_kd, g_ce = grads[0], grads[1]
                    g_far = grads[2] if s_far is not None else None
                else:
                    g_kd = g_ce = None
            total += loss_c.detach().to(acc)
            parts += parts_c.detach().to(acc)
            if needs_grad:
                dz = _logit_grad(z, zT, lse1, T, g_kd, g_ce, g_far, far_mask, ids if full else ids_c, tgt_c)
                dz_mm = dz.to(mm_dtype)
                grad_h[sl] = matmul_acc(dz_mm, w_mm, acc).to(grad_h.dtype)
                if mm_dtype == acc:
                    grad_w.addmm_(dz.T, h_c)
                else:  # bf16 operands: fp32 products, accumulated across chunks in fp32
                    grad_w.add_(matmul_acc(dz_mm.T, h_c, acc))
            del z, zT
        ctx.save_for_backward(grad_h if needs_grad else torch.empty(0), grad_w if needs_grad else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        ctx.needs_grad = needs_grad
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, grad_parts):
        grad_h, grad_w = ctx.saved_tensors
        if not ctx.needs_grad:
            return (None,) * 11
        g = grad_total.to(grad_w.dtype)
        return (grad_h * g.to(grad_h.dtype), (grad_w * g).to(ctx.weight_dtype)) + (None,) * 9


def _logit_grad(z, zT, lse1, T, g_kd, g_ce, g_far, far_mask, ids, tgt_c):
    """d loss / d z for one chunk [c, V], built in z's own buffer (z is not read again) with one softmax.

    With p = softmax(z) and F the far set (``beyond_topk``)::

        d s_ce / d z_v  = [v == target] - p_v
        d s_i / d z_v   = ([v == id_i] - softmax(z / T)_v) / T
        d s_far / d z_v = [v in F] p_v exp(lse(z) - lse_F(z)) - p_v

    so dz = p * coef + the scatters, where coef = -(g_ce + g_far + sum_i g_i [T = 1]) (+ the far term on F):
    one exp pass and one multiply over [c, V] whatever the terms (one more softmax for T != 1).
    ``ids``: [c, K] stored ids, or an int V' (the ids are 0..V'-1).
    """
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    a = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)  # the coefficient of -p per row
    if g_ce is not None:
        a = a + g_ce
    if g_far is not None:
        a = a + g_far
    kd_t = None  # T != 1: the kd term's own softmax, at temperature T
    if g_kd is not None:
        if T == 1.0:
            a = a + g_kd.sum(-1)
        else:
            kd_t = torch.softmax(zT, -1).mul_(-g_kd.sum(-1, keepdim=True) / T)
    coef = -a[:, None]
    if g_far is not None:
        lse_f = torch.logsumexp(z.masked_fill(~far_mask, float("-inf")), -1, keepdim=True)
        coef = coef + torch.where(far_mask, g_far[:, None] * (lse1 - lse_f).exp(), zero)
    dz = z.sub_(lse1).exp_().mul_(coef)
    if kd_t is not None:
        dz.add_(kd_t)
    if g_kd is not None:
        g = g_kd if T == 1.0 else g_kd / T
        if isinstance(ids, int):
            dz[:, :ids].add_(g)
        else:
            dz.scatter_add_(1, ids, g)
    if g_ce is not None:
        dz.scatter_add_(1, tgt_c, g_ce[:, None])
    return dz


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor | int,
    targets: torch.Tensor,
    row_fn: RowFn,
    n_parts: int,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    far_k: int = 0,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked lm_head + row losses. hidden [N, H], weight [V, H], ids [N, K] (>= 0), targets [N].

    ``ids`` may be an int V' <= V instead: every row's ids are 0..V'-1 (full-distribution targets).

    ``row_fn(s_kd [c, K], s_ce [c], rows: slice) -> (loss scalar, parts [n_parts])`` gets the student's
    full-vocabulary log-probs at temperature T at ``ids`` and at T = 1 at ``targets``. Returns the
    summed loss (differentiable w.r.t. hidden and weight) and the summed parts (detached).
    ``matmul_dtype``: the lm_head matmuls' operand dtype (bf16 under the trainer's CUDA autocast; None: the
    hidden states' own); logits, softmax and gradients stay in float32 whatever it is.
    """
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.device)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedHeadLoss.apply(hidden, weight, ids, targets, row_fn, int(chunk_rows), float(temperature), needs_grad, n_parts, int(far_k), matmul_dtype)


# --------------------------------------------------------------------------------------------------
# The one interface


PART_NAMES = ("loss", "kd", "ce")


class DistillLoss:
    """``loss, parts = DistillLoss(cfg, vocab_size)(hidden, weight, rows)``.

    rows (a ``loader.Rows``-like object with tensors on the device): ``topk_ids`` [N, K] int64 (-1 pad),
    ``topk_logprobs`` [N, K] float32 (-inf pad), ``target_weights`` [N, K] or None,
    (or ``topk_ids`` None and ``topk_logprobs`` [N, V']: the teacher's full distribution, ids 0..V'-1),
    ``targets`` [N] int64 (the data token), ``row_weight`` [N] float32 (averaging weights, summing to
    1 over the global batch), optionally ``ce_on_data`` (False: no CE on these rows, whatever ``ce_weight``
    says, unless the loss is CE only). hidden [N, H] are the student's final hidden states that predict them.
    Returns the weighted loss (scalar) and a dict of its parts (weighted sums, floats).
    """

    def __init__(self, cfg: LossConfig, vocab_size: int | None = None):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.ce_weight = 1.0 if cfg.kind == "sft" else float(cfg.ce_weight)

    def row_fn(self, rows) -> RowFn:
        cfg = self.cfg

        def valid(sl: slice) -> torch.Tensor:
            # per chunk: with full-distribution targets an [N, V'] mask would be one more big tensor
            ok = torch.isfinite(rows.topk_logprobs[sl])
            return ok if rows.topk_ids is None else ok & (rows.topk_ids[sl] >= 0)

        tw = rows.target_weights
        td = getattr(rows, "target_drawn", None)
        cw = self.ce_weight if (getattr(rows, "ce_on_data", True) or self.ce_weight >= 1.0) else 0.0

        def fn(s_kd: torch.Tensor, s_ce: torch.Tensor, sl: slice, s_far: torch.Tensor | None = None):
            rw = rows.row_weight[sl]
            if cfg.kind == "sft" or cw >= 1.0:
                kd = torch.zeros_like(s_ce)
            else:
                kd = kd_row_losses(cfg, s_kd, rows.topk_logprobs[sl], valid(sl), None if tw is None else tw[sl], self.vocab_size, s_far,
                                   None if td is None else td[sl])
            ce = -s_ce
            kd_sum = (rw * kd).sum()
            ce_sum = (rw * ce).sum()
            loss = (1.0 - cw) * kd_sum + cw * ce_sum if cw > 0 else kd_sum
            return loss, torch.stack([loss.detach(), kd_sum.detach(), ce_sum.detach()])

        return fn

    def parts_tensor(self, hidden: torch.Tensor, weight: torch.Tensor, rows, matmul_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, parts [len(PART_NAMES)] detached, on the device): no host read, for the training step."""
        ids = rows.topk_logprobs.shape[1] if rows.topk_ids is None else rows.topk_ids.clamp(min=0)
        far_k = self.cfg.beyond_topk if (rows.target_weights is not None and rows.topk_ids is not None) else 0
        return fused_head_loss(hidden, weight, ids, rows.targets, self.row_fn(rows), len(PART_NAMES), self.cfg.temperature, self.cfg.chunk_rows, far_k,
                               matmul_dtype)

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, rows) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = self.parts_tensor(hidden, weight, rows)
        return loss, dict(zip(PART_NAMES, parts.tolist()))
