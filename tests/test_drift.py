"""The drift tests on constructed samples whose answer is known."""

import numpy as np
import pytest

from kftune.drift_tests import confidence_test, distribution_test, mmd_test, psi, vocabulary_test


def gaussian(n, shift=0.0, seed=0, dim=8):
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, dim))


def test_mmd_same_distribution_is_not_drift_and_a_shift_is():
    same = mmd_test(gaussian(300, seed=1), gaussian(300, seed=2), permutations=500, alpha=0.01, seed=0)
    assert not same.verdict and same.p_value > 0.01
    shifted = mmd_test(gaussian(300, seed=1), gaussian(300, shift=0.5, seed=2), permutations=500, alpha=0.01, seed=0)
    assert shifted.verdict and shifted.p_value < 0.01 and shifted.score > same.score
    again = mmd_test(gaussian(300, seed=1), gaussian(300, shift=0.5, seed=2), permutations=500, alpha=0.01, seed=0)
    assert again.p_value == shifted.p_value, "seeded: the same inputs give the same p-value"


def test_mmd_with_an_empty_side_is_no_drift():
    check = mmd_test(np.zeros((0, 8)), gaussian(10), permutations=100, alpha=0.05, seed=0)
    assert not check.verdict and check.p_value == 1.0 and check.details["empty"]


def test_identical_samples_are_not_drift_whatever_the_float_rounding():
    """Every permutation of identical samples has the observed statistic up to float32 rounding: p must be 1."""
    for x in (np.ones((60, 8)), np.repeat(gaussian(3, seed=5), 20, axis=0)):
        check = mmd_test(x, x.copy(), 200, 0.05, seed=0)
        assert not check.verdict and check.p_value == 1.0


def test_mmd_false_alarm_rate_is_near_alpha():
    """Under the null the permutation p-value is uniform: about alpha of i.i.d. pairs are flagged."""
    flagged = [mmd_test(gaussian(100, seed=2 * i), gaussian(100, seed=2 * i + 1), 200, 0.1, seed=i).verdict
               for i in range(60)]
    assert np.mean(flagged) <= 0.2, f"{np.mean(flagged):.2f} of null pairs flagged at alpha 0.1"


def test_psi_known_values():
    assert psi(np.array([50.0, 50.0]), np.array([50.0, 50.0])) == 0
    expected = 0.4 * np.log(0.9 / 0.5) + 0.4 * np.log(0.5 / 0.1)
    assert psi(np.array([50.0, 50.0]), np.array([90.0, 10.0])) == pytest.approx(expected)


def test_label_distribution_shift():
    ref = ["neutral"] * 45 + ["positive"] * 30 + ["negative"] * 25
    same = distribution_test("label", ref, ref[::-1], ["negative", "neutral", "positive"], 0.2, 0.05)
    assert not same.verdict and same.p_value == pytest.approx(1.0)
    moved = ["negative"] * 55 + ["neutral"] * 25 + ["positive"] * 20
    shift = distribution_test("label", ref, moved, ["negative", "neutral", "positive"], 0.2, 0.05)
    assert shift.verdict and shift.score > 0.2 and shift.p_value < 0.01
    assert shift.rule == "> 0.2 and chi-squared p < 0.05"
    assert shift.details["new"] == {"negative": 0.55, "neutral": 0.25, "positive": 0.2}


def test_a_small_sample_over_many_labels_is_not_drift_by_psi_alone():
    """PSI grows with the number of categories and shrinks with the sample: 50 rows over 20 labels drawn from
    the reference's own shares pass PSI 0.2 almost every time. The chi-squared test must agree."""
    rng = np.random.default_rng(0)
    labels = [f"l{i}" for i in range(20)]
    ref = list(rng.choice(labels, 2000))
    checks = [distribution_test("label", ref, list(rng.choice(labels, 50)), labels, 0.2, 0.05) for _ in range(200)]
    assert np.mean([c.score > 0.2 for c in checks]) > 0.9, "the sample is small enough to fool PSI"
    assert np.mean([c.verdict for c in checks]) <= 0.1
    # 30 rows without one of four labels (21% likely under the reference's shares): PSI 0.31, no drift
    ref = ["r"] * 100 + ["x"] * 700 + ["y"] * 600 + ["z"] * 600
    check = distribution_test("label", ref, ["x"] * 11 + ["y"] * 10 + ["z"] * 9, ["r", "x", "y", "z"], 0.2, 0.05)
    assert check.score > 0.3 and check.p_value > 0.5 and not check.verdict


def test_confidence_shift():
    rng = np.random.default_rng(0)
    confident = 0.5 + 0.5 * rng.beta(8, 1, 500)
    assert not confidence_test(confident[:250], confident[250:], 0.01).verdict
    unsure = 0.5 + 0.5 * rng.beta(2, 2, 250)
    check = confidence_test(confident[:250], unsure, 0.01)
    assert check.verdict and check.details["new_mean"] < check.details["reference_mean"]


def test_vocabulary_shift_counts_only_words_new_to_training():
    train = ["profit rose at the unit", "costs fell at the bank"]
    held_out = ["profit fell", "the unit rose"]
    assert not vocabulary_test(train, held_out, ["costs rose at the bank"], 0.05).verdict
    check = vocabulary_test(train, held_out, ["staking yields rose", "token bridge exploit"], 0.05)
    assert check.details["reference_oov_rate"] == 0 and check.details["new_oov_rate"] == pytest.approx(5 / 6)
    assert check.verdict and check.score == pytest.approx(5 / 6)
    assert set(check.details["top_new_words"]) == {"staking", "yields", "token", "bridge", "exploit"}
