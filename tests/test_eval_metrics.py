"""kdship eval metrics against hand-computed values; perturbations seeded and reproducible."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from kdship import answers as A
from kdship.eval import metrics as M
from kdship.eval.perturb import PERTURBATIONS, parse_perturbations, perturb_text


# ---- answers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("so she pays $18.00 in total. #### $18.00", "18"),
        ("The answer is 42.", "42"),
        ("Therefore, the final answer is: -3", "-3"),
        ("We get \\boxed{17} at the end", "17"),
        ("5 apples, then 7 more, 12 in all", "12"),
        ("The answer is Paris.", "paris"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text, want):
    assert A.extract_answer(text) == want


def test_exact_match_hand_values():
    ref = "3 + 4 = 7\n#### 7"
    assert M.exact_match("The answer is 7", ref) == 1.0
    assert M.exact_match("7.0", ref) == 1.0  # 7.0 == 7 after normalisation
    assert M.exact_match("The answer is 8", ref) == 0.0
    assert M.exact_match("I don't know", ref) == 0.0
    # "#### X" wins over a later number in the text
    assert M.exact_match("#### 7 (checked with 3 and 4)", ref) == 1.0
    assert A.answers_equal("1,000", "1000.00") and not A.answers_equal(None, "1")


# ---- ROUGE-L -----------------------------------------------------------------------------------------
def test_lcs_and_rouge_l_hand_values():
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert M.lcs_length([], [1]) == 0
    # candidate 4 words, reference 5 words, LCS "the cat the mat" = 4? -> compute: c = the cat sat mat,
    # r = the cat is on mat; LCS = the cat mat = 3. P = 3/4, R = 3/5, F = 2PR/(P+R) = 0.6667
    r = M.rouge_l("The cat sat mat", "the cat is on mat")
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["recall"] == pytest.approx(3 / 5)
    assert r["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert M.rouge_l("a b c", "a b c")["f1"] == 1.0
    assert M.rouge_l("x y", "a b")["f1"] == 0.0
    assert M.rouge_l("", "a b")["f1"] == 0.0
    # several references: the best F1 counts
    assert M.rouge_l_multi("a b c", ["x", "a b c d"])["f1"] == pytest.approx(2 * 1 * 0.75 / 1.75)


# ---- language modelling --------------------------------------------------------------------------------
def test_perplexity_and_token_logprobs_hand_values():
    # two positions, vocab 3: uniform logits -> log(1/3); logits (ln 1, ln 2, ln 1) -> p(token 1) = 1/2
    logits = np.array([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])
    lp = M.token_logprobs(logits, np.array([2, 1]))
    np.testing.assert_allclose(lp, [math.log(1 / 3), math.log(1 / 2)], atol=1e-12)
    nll = -lp.sum()
    # perplexity = exp(mean NLL) = (3 * 2) ** (1/2)
    assert M.perplexity(nll, 2) == pytest.approx(math.sqrt(6.0))
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)


def test_kl_full_and_topk_hand_values():
    p = np.log(np.array([[0.5, 0.3, 0.2]]))
    q = np.log(np.array([[0.25, 0.25, 0.5]]))
    want = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert M.full_kl(p, q)[0] == pytest.approx(want)
    assert M.full_kl(p, p)[0] == pytest.approx(0.0)
    # top-2 of the teacher (ids 0, 1) + rest bin (p 0.2, q 0.5): here the coarsening loses nothing
    kl2 = M.topk_kl(np.array([[0, 1]]), p[:, :2].astype(np.float32), q)
    assert kl2[0] == pytest.approx(want, abs=1e-6)
    # top-1 (id 0) + rest (p 0.5, q 0.75): smaller than the full KL (data-processing inequality)
    kl1 = M.topk_kl(np.array([[0]]), p[:, :1], q)
    assert kl1[0] == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert kl1[0] <= want
    # padding entries (-1 / -inf) are ignored
    kl_pad = M.topk_kl(np.array([[0, -1]]), np.array([[math.log(0.5), -np.inf]]), q)
    assert kl_pad[0] == pytest.approx(kl1[0])


# ---- choices ---------------------------------------------------------------------------------------------
def test_choice_prediction_and_accuracy_hand_values():
    assert M.choice_prediction([-3.0, -1.5, -2.0]) == 1
    # per-length: -3/6 = -0.5 beats -1.5/1 and -2/2
    assert M.choice_prediction([-3.0, -1.5, -2.0], [6, 1, 2]) == 0
    assert M.accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    with pytest.raises(ValueError):
        M.accuracy([1], [1, 2])


# ---- retention and attack success ---------------------------------------------------------------------
def test_retention_both_directions():
    r = M.retention(0.6, 0.8, higher_is_better=True)
    assert r["ratio"] == pytest.approx(0.75) and r["retention"] == pytest.approx(0.75)
    # perplexity: student 20 vs teacher 10 -> ratio 2.0 (raw), retention 0.5 (half the teacher's level)
    r = M.retention(20.0, 10.0, higher_is_better=False)
    assert r["ratio"] == pytest.approx(2.0) and r["retention"] == pytest.approx(0.5)
    assert M.retention(0.5, 0.0, True) == {"ratio": None, "retention": None}
    assert M.retention(None, 1.0, True)["ratio"] is None
    assert M.retention(0.0, 0.1, higher_is_better=False)["retention"] is None


def test_attack_success_arithmetic():
    before = [True, True, True, False, False, True]
    after = [True, False, False, True, False, True]
    a = M.attack_success(before, after)
    assert a["flipped"] == 2 and a["fixed"] == 1 and a["right_before"] == 4 and a["items"] == 6
    assert a["attack_success_rate"] == pytest.approx(2 / 6)
    assert a["attack_success_rate_of_correct"] == pytest.approx(2 / 4)
    assert M.attack_success([False], [False])["attack_success_rate_of_correct"] is None
    with pytest.raises(ValueError):
        M.attack_success([True], [])


# ---- perturbations ---------------------------------------------------------------------------------------
TEXT = "Tom has 3 apples and buys 14 more at the market. How many apples does Tom have now? Please explain."


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbations_are_seeded_reproducible_and_change_only_words(kind):
    a = perturb_text(TEXT, kind, seed=0, item=4)
    assert a == perturb_text(TEXT, kind, seed=0, item=4)
    assert a != TEXT
    # another seed or another item draws another edit (for these inputs)
    assert {perturb_text(TEXT, kind, seed=s, item=4) for s in range(6)} != {a}
    # numbers never change: the question keeps its answer
    import re

    assert re.findall(r"\d+", a) == re.findall(r"\d+", TEXT)
    if kind == "swap":
        assert sorted(a.split()) == sorted(TEXT.split())
    if kind == "distractor":
        assert len(a) > len(TEXT) and all(w in a for w in TEXT.split())
    if kind == "typo":
        assert len(a.split()) == len(TEXT.split())


def test_perturbation_is_the_same_in_a_fresh_process():
    code = "from kdship.eval.perturb import perturb_text as p; print(p(%r, 'typo', 3, 9) + '|' + p(%r, 'swap', 3, 9))" % (TEXT, TEXT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == perturb_text(TEXT, "typo", 3, 9) + "|" + perturb_text(TEXT, "swap", 3, 9)


def test_parse_perturbations_names_the_unknown_one():
    assert parse_perturbations("typo, swap,typo") == ["typo", "swap"]
    assert parse_perturbations(None) == []
    with pytest.raises(ValueError, match="'typos'"):
        parse_perturbations("typos")


def test_repeated_ngram_share_hand_values():
    assert M.repeated_ngram_share("a b c d a b c d a b c d") == pytest.approx(5 / 9)  # 9 4-grams, 4 distinct
    assert M.repeated_ngram_share("the quick brown fox jumps over the lazy dog") == 0.0
    assert M.repeated_ngram_share("too short") == 0.0
    assert M.repeated_ngram_share("x y x y", n=2) == pytest.approx(1 / 3)
