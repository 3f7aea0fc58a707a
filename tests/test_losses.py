"""Distillation losses against straightforward full-logit references (values and gradients)."""

from types import SimpleNamespace

import pytest
import torch

from kdship.train.losses import KINDS, DistillLoss, LossConfig, kd_row_losses

DIVS = [k for k in KINDS if k != "sft"]


def ref_kl(a, b):
    return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), torch.zeros_like(a)).sum(-1)


def ref_div(kind, p, q, beta=0.5, alpha=0.1):
    """Textbook definitions on explicit probability vectors [N, C] (float64)."""
    if kind == "fkl":
        return ref_kl(p, q)
    if kind == "rkl":
        return ref_kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if kind == "skl":
        return ref_kl(p, alpha * p + (1 - alpha) * q)
    if kind == "srkl":
        return ref_kl(q, alpha * q + (1 - alpha) * p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def make_case(N=24, H=16, V=40, K=6, seed=0, blank_rows=(3,), short_rows=(5,), sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    t_full = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * sharp, -1)
    t_lp, ids = t_full.topk(K, -1)
    ids = ids.clone()
    t_lp = t_lp.clone()
    for r in blank_rows:  # a row with no target at all (row 0 of a sample)
        ids[r] = -1
        t_lp[r] = -float("inf")
    for r in short_rows:  # a row with fewer stored ids than K
        ids[r, K // 2 :] = -1
        t_lp[r, K // 2 :] = -float("inf")
    targets = torch.randint(0, V, (N,), generator=g)
    row_weight = torch.rand(N, generator=g, dtype=torch.float64)
    row_weight /= row_weight.sum()
    return SimpleNamespace(hidden=hidden, weight=weight, t_full=t_full, topk_ids=ids, topk_logprobs=t_lp, targets=targets, row_weight=row_weight, target_weights=None)


def fused(case, cfg, vocab_size=None, chunk_rows=5):
    cfg.chunk_rows = chunk_rows
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    loss, parts = DistillLoss(cfg, vocab_size)(h, w, case)
    loss.backward()
    return loss.detach(), parts, h.grad, w.grad


def reference(case, cfg):
    """Full logits through autograd; the tail built explicitly from probabilities."""
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    T = cfg.temperature
    z = h @ w.T
    q_full = torch.softmax(z / T, -1)
    valid = case.topk_ids >= 0
    ids = case.topk_ids.clamp(min=0)
    p_in = torch.where(valid, case.topk_logprobs.exp(), 0.0)
    q_in = torch.where(valid, q_full.gather(1, ids), 0.0)
    if cfg.tail == "renorm":
        pt = torch.where(valid, p_in ** (1 / T), 0.0)
        p = pt / pt.sum(-1, keepdim=True).clamp_min(1e-300)
        q = q_in / q_in.sum(-1, keepdim=True).clamp_min(1e-300)
    else:
        p = torch.cat([p_in, (1 - p_in.sum(-1, keepdim=True)).clamp_min(0)], -1)
        q = torch.cat([q_in, 1 - q_in.sum(-1, keepdim=True)], -1)
        if T != 1:
            p = p ** (1 / T)
            p = p / p.sum(-1, keepdim=True)
    d = ref_div(cfg.kind, p, q, cfg.beta, cfg.alpha)
    d = torch.where(valid.any(-1), d, 0.0)
    ce = -torch.log_softmax(z, -1).gather(1, case.targets[:, None]).squeeze(1)
    cw = cfg.ce_weight
    loss = (case.row_weight * ((1 - cw) * d + cw * ce)).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("kind", DIVS)
def test_value_and_gradient_match_reference(kind, tail):
    case = make_case(seed=DIVS.index(kind) * 2 + (tail == "renorm"))
    cfg = LossConfig(kind=kind, tail=tail, ce_weight=0.25, beta=0.3, alpha=0.2)
    loss, parts, gh, gw = fused(case, cfg)
    ref_loss, ref_gh, ref_gw = reference(case, cfg)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-8, abs=1e-10)
    assert parts["loss"] == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_temperature_matches_reference(kind):
    case = make_case(seed=11)
    for tail in ("renorm", "bucket"):
        cfg = LossConfig(kind=kind, tail=tail, temperature=2.0, ce_weight=0.5)
        loss, _, gh, gw = fused(case, cfg)
        ref_loss, ref_gh, ref_gw = reference(case, cfg)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-8)
        torch.testing.assert_close(gh, ref_gh)
        torch.testing.assert_close(gw, ref_gw)


def test_sft_is_cross_entropy_on_data_tokens():
    case = make_case(seed=3)
    loss, parts, gh, _ = fused(case, LossConfig(kind="sft"))
    h = case.hidden.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(h @ case.weight.T, case.targets, reduction="none")
    ref = (case.row_weight * ce).sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert parts["kd"] == 0.0
    torch.testing.assert_close(gh, h.grad)


@pytest.mark.parametrize("kind", DIVS)
def test_k_equal_vocab_reproduces_full_vocabulary_kd(kind):
    """Both tails, K = V: the same loss and gradients as KD on the full distributions."""
    V = 32
    case = make_case(V=V, K=V, blank_rows=(), short_rows=(), seed=5)
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    q_full = torch.softmax(h @ w.T, -1)
    ref = (case.row_weight * ref_div(kind, case.t_full.exp(), q_full, 0.5, 0.1)).sum()
    ref.backward()
    for tail in ("bucket", "renorm"):
        loss, _, gh, gw = fused(case, LossConfig(kind=kind, tail=tail), vocab_size=V)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12), tail
        torch.testing.assert_close(gh, h.grad, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(gw, w.grad, rtol=1e-7, atol=1e-12)


def test_full_vocabulary_in_float32_is_also_exact():
    """float32 teacher logprobs summing to 1 +- rounding: no spurious rest category."""
    V = 64
    case = make_case(V=V, K=V, blank_rows=(), short_rows=(), seed=8)
    for name in ("hidden", "weight", "t_full", "topk_logprobs", "row_weight"):
        setattr(case, name, getattr(case, name).float())
    loss, _, _, _ = fused(case, LossConfig(kind="rkl", tail="bucket"), vocab_size=V)
    q = torch.softmax(case.hidden.double() @ case.weight.double().T, -1)
    ref = (case.row_weight.double() * ref_div("rkl", case.t_full.double().exp(), q)).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


@pytest.mark.parametrize("kind", DIVS)
def test_full_distribution_targets_equal_k_equal_vocab(kind):
    """Online KD's rows (topk_ids None, [N, V] logprobs: ids implied) = the k = V store rows."""
    V = 32
    case = make_case(V=V, K=V, blank_rows=(), short_rows=(), seed=9)
    full = SimpleNamespace(**{**case.__dict__, "topk_ids": None, "topk_logprobs": case.t_full})
    for tail in ("bucket", "renorm"):
        a = fused(case, LossConfig(kind=kind, tail=tail, ce_weight=0.2), vocab_size=V)
        b = fused(full, LossConfig(kind=kind, tail=tail, ce_weight=0.2), vocab_size=V)
        assert b[0].item() == pytest.approx(a[0].item(), rel=1e-12), tail
        torch.testing.assert_close(b[2], a[2], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(b[3], a[3], rtol=1e-10, atol=1e-14)


def test_full_distribution_targets_with_a_padded_student_vocabulary():
    """Teacher over the tokenizer's V ids, student table padded to V + 8: forward KL over the V ids."""
    V, pad = 32, 8
    case = make_case(V=V + pad, K=V, blank_rows=(), short_rows=(), seed=10)
    t_full = torch.log_softmax(case.t_full[:, :V], -1)
    full = SimpleNamespace(**{**case.__dict__, "topk_ids": None, "topk_logprobs": t_full})
    loss, _, gh, gw = fused(full, LossConfig(kind="fkl", tail="bucket"), vocab_size=V)
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    lq = torch.log_softmax(h @ w.T, -1)[:, :V]
    ref = (case.row_weight * (t_full.exp() * (t_full - lq)).sum(-1)).sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("kind", DIVS)
def test_sampled_targets_with_exact_weights_equal_the_divergence(kind):
    """With every id present and w_i = p_i the importance estimate is the divergence itself."""
    V = 24
    case = make_case(V=V, K=V, blank_rows=(), short_rows=(), seed=2)
    s_lp = torch.log_softmax(case.hidden @ case.weight.T, -1).gather(1, case.topk_ids)
    valid = case.topk_ids >= 0
    est = kd_row_losses(LossConfig(kind=kind), s_lp, case.topk_logprobs, valid, target_weights=case.topk_logprobs.exp())
    ref = ref_div(kind, case.t_full.exp(), torch.softmax(case.hidden @ case.weight.T, -1))
    torch.testing.assert_close(est, ref, rtol=1e-9, atol=1e-12)


def test_sampled_targets_are_unbiased_for_forward_kl():
    """12 draws per position (the paper's setting): the mean estimate converges to the exact KL."""
    g = torch.Generator().manual_seed(0)
    V, R, draws = 50, 4000, 12
    t = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, -1)
    s = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    exact = ref_div("fkl", t.exp()[None], s.exp()[None]).item()
    samples = torch.multinomial(t.exp().expand(R, V), draws, replacement=True, generator=g)
    counts = torch.zeros(R, V, dtype=torch.float64).scatter_add_(1, samples, torch.ones(R, draws, dtype=torch.float64))
    # store layout: distinct drawn ids, padded with -1
    K = int((counts > 0).sum(-1).max())
    order = counts.argsort(-1, descending=True)[:, :K]
    c = counts.gather(1, order)
    ids = torch.where(c > 0, order, -1)
    t_lp = torch.where(c > 0, t[order.clamp(min=0)], -float("inf"))
    s_lp = s[ids.clamp(min=0)]
    est = kd_row_losses(LossConfig(kind="fkl"), s_lp, t_lp, ids >= 0, target_weights=c / draws)
    assert est.mean().item() == pytest.approx(exact, rel=0.03)
    # top-k at the same number of ids is biased low (it ignores the tail)
    topk_lp, topk_ids = t.topk(K)
    biased = kd_row_losses(LossConfig(kind="fkl", tail="renorm"), s[topk_ids][None], topk_lp[None], torch.ones(1, K, dtype=torch.bool))
    assert abs(biased.item() - exact) > abs(est.mean().item() - exact)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("kind", KINDS)
def test_finite_gradients_with_minus_inf_rows(kind, tail):
    case = make_case(seed=4, blank_rows=(0, 1, 2, 7), short_rows=(5, 9))
    for name in ("hidden", "weight", "topk_logprobs", "row_weight"):
        setattr(case, name, getattr(case, name).float())
    case.topk_logprobs[10, 1:] = -float("inf")  # valid id but -inf logprob counts as absent
    loss, _, gh, gw = fused(case, LossConfig(kind=kind, tail=tail, ce_weight=0.1))
    assert torch.isfinite(loss)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert gh[0].abs().sum() > 0  # blank rows still get the CE gradient


def test_chunking_does_not_change_the_result():
    case = make_case(N=37, seed=6)
    cfg = LossConfig(kind="jsd", tail="bucket", ce_weight=0.3)
    a = fused(case, cfg, chunk_rows=1)
    b = fused(case, LossConfig(kind="jsd", tail="bucket", ce_weight=0.3), chunk_rows=1000)
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-12)
    torch.testing.assert_close(a[2], b[2])
    torch.testing.assert_close(a[3], b[3])


def test_bf16_matmul_operands_stay_near_the_float64_reference():
    """matmul_dtype=bf16 (the trainer's CUDA autocast): bf16 operands, fp32 logits and gradients. Value and
    gradients within bf16's rounding of the float64 reference, every output written in float32."""
    case = make_case(N=41, H=64, V=300, K=8, seed=13)
    cfg = LossConfig(kind="fkl", tail="bucket", ce_weight=0.5, chunk_rows=7)
    ref_loss, ref_gh, ref_gw = reference(case, cfg)
    h = case.hidden.float().requires_grad_(True)
    w = case.weight.float().requires_grad_(True)
    rows = SimpleNamespace(**{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in vars(case).items()})
    loss, parts = DistillLoss(cfg).parts_tensor(h, w, rows, matmul_dtype=torch.bfloat16)
    loss.backward()
    assert loss.dtype == torch.float32 and parts.dtype == torch.float32
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    assert rel(h.grad, ref_gh) < 2e-2 and rel(w.grad, ref_gw) < 2e-2
    # and not the float32 result by accident: bf16 rounding is visible
    l32, _ = DistillLoss(cfg).parts_tensor(case.hidden.float(), case.weight.float(), rows)
    assert loss.item() != l32.item()


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="--loss"):
        LossConfig(kind="kl2")
    with pytest.raises(ValueError, match="--tail"):
        LossConfig(tail="drop")
    with pytest.raises(ValueError, match="--beta"):
        LossConfig(kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="--ce-weight"):
        LossConfig(ce_weight=2)


def test_rows_without_ce_on_data_train_through_the_teacher_alone():
    """An on-policy round store's rows (ce_on_data False) get no CE, whatever --ce-weight says: the loss and
    its gradient equal pure KD's; CE-only training (sft) still trains on them."""
    case = make_case()
    mixed = fused(SimpleNamespace(**case.__dict__, ce_on_data=False), LossConfig(kind="fkl", tail="bucket", ce_weight=0.5))
    pure = fused(case, LossConfig(kind="fkl", tail="bucket", ce_weight=0.0))
    assert mixed[1]["ce"] > 0 and mixed[0] == pytest.approx(float(pure[0]), rel=1e-12)
    torch.testing.assert_close(mixed[2], pure[2])
    with_ce = fused(case, LossConfig(kind="fkl", tail="bucket", ce_weight=0.5))
    assert abs(float(with_ce[0]) - float(pure[0])) > 1e-3  # the mix differs where CE is on
    sft = fused(SimpleNamespace(**case.__dict__, ce_on_data=False), LossConfig(kind="sft"))
    assert sft[0] == pytest.approx(sft[1]["ce"], rel=1e-9)
