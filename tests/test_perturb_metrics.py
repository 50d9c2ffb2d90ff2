"""GEARS' perturbation metrics on hand-computed cases, and the baselines on data built so their
answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest
from perturb_fixtures import hand_data
from scipy.stats import pearsonr

from celljepa_dist.perturb.baselines import additive, control_mean, linear, mean_shift
from celljepa_dist.perturb.metrics import (
    METRICS,
    evaluate_predictions,
    frac_correct_direction,
    pearson,
    perturbation_metrics,
    subgroup_means,
)


def test_pearson_matches_hand_and_scipy_and_zero_when_undefined():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # a = (0, 1, 2), b = (0, 2, 1): centred (-1, 0, 1), (-1, 1, 0) -> 1 / (sqrt2 sqrt2) = 0.5
    assert pearson([0, 1, 2], [0, 2, 1]) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(pearsonr(a, b)[0], abs=1e-12)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # GEARS: NaN -> 0 (a constant prediction)
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_frac_correct_direction_counts_equal_signs_including_zero():
    ctrl = np.array([1.0, 1.0, 1.0, 1.0])
    pred = np.array([2.0, 0.0, 1.0, 1.0])   # up, down, none, none
    truth = np.array([3.0, 2.0, 1.0, 0.0])  # up, up, none, down
    assert frac_correct_direction(pred, truth, ctrl) == 0.5  # genes 0 and 2


def test_perturbation_metrics_hand_computed():
    ctrl = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    truth = np.array([3.0, 1.0, 0.0, 2.0, 1.0])
    pred = np.array([2.0, 1.0, 0.5, 1.0, 1.0])
    de, nd = np.array([0, 2, 3]), np.array([0, 2])
    m = perturbation_metrics(pred, truth, ctrl, de, nd)
    assert set(m) == set(METRICS)
    assert m["mse"] == pytest.approx((1 + 0 + 0.25 + 1 + 0) / 5)
    assert m["mse_de"] == pytest.approx((1 + 0.25 + 1) / 3)
    # deltas: truth (2, 0, -1, 1, 0), pred (1, 0, -0.5, 0, 0)
    assert m["pearson_delta"] == pytest.approx(pearsonr([1, 0, -0.5, 0, 0], [2, 0, -1, 1, 0])[0])
    assert m["pearson_de_delta"] == pytest.approx(pearsonr([1, -0.5, 0], [2, -1, 1])[0])
    # on T = {0, 2} any two distinct points correlate perfectly: both increase together
    assert m["pearson_delta_top20_de_non_dropout"] == pytest.approx(1.0)
    assert m["pearson_top20_de_non_dropout"] == pytest.approx(1.0)
    assert m["pearson"] == pytest.approx(pearsonr(pred, truth)[0])
    assert m["pearson_de"] == pytest.approx(pearsonr(pred[de], truth[de])[0])
    # directions on D: gene 0 up/up, gene 2 down/down, gene 3 none/up -> 2 of 3
    assert m["frac_correct_direction_20"] == pytest.approx(2 / 3)


def test_control_prediction_scores_zero_delta_and_perfect_prediction_scores_one():
    data = hand_data({"ctrl": [1, 1, 1, 1], "G0+ctrl": [0, 2, 1, 3], "G1+ctrl": [1, 0, 3, 1]})
    per = evaluate_predictions(data, control_mean(data, ["ctrl"], ["G0+ctrl", "G1+ctrl"]))
    assert all(per[p]["pearson_delta"] == 0.0 for p in per)
    exact = evaluate_predictions(data, {p: data.mean(p) for p in ("G0+ctrl", "G1+ctrl")})
    assert all(exact[p]["pearson_delta"] == pytest.approx(1.0) and exact[p]["mse"] == 0 for p in exact)


def test_predicted_cells_are_averaged_before_scoring():
    data = hand_data({"ctrl": [1, 1, 1], "G0+ctrl": [0, 2, 4]})
    cells = np.array([[0, 1, 5], [0, 3, 3]])  # mean (0, 2, 4): the truth
    assert evaluate_predictions(data, {"G0+ctrl": cells})["G0+ctrl"]["mse"] == 0


def test_subgroup_means_average_over_perturbations_and_skip_empty_groups():
    per = {"a": {m: 1.0 for m in METRICS}, "b": {m: 0.0 for m in METRICS}, "c": {m: 0.5 for m in METRICS}}
    out = subgroup_means(per, {"unseen_single": ["a", "b"], "combo_seen0": [], "combo_seen2": ["c"]})
    assert out["unseen_single"]["pearson"] == 0.5 and out["unseen_single"]["n_perturbations"] == 2
    assert out["combo_seen2"]["mse"] == 0.5
    assert "combo_seen0" not in out


def _additive_world():
    """ctrl 0; singles with known shifts; A+B exactly additive, A+C not."""
    s = {"A": [1.0, 0.0, -1.0, 0.0, 2.0], "B": [0.0, 2.0, 1.0, -1.0, 0.0], "C": [0.0, 0.0, 0.0, 3.0, -1.0]}
    means = {"ctrl": [5.0] * 5}
    means.update({f"{g}+ctrl": list(5 + np.array(v)) for g, v in s.items()})
    means["A+B"] = list(5 + np.array(s["A"]) + np.array(s["B"]))
    means["A+C"] = list(5 + 3 * np.array(s["A"]) - np.array(s["C"]))  # not additive
    means["B+C"] = list(5 + np.array(s["B"]) + np.array(s["C"]))
    return hand_data(means, gene_names=["A", "B", "C", "D", "E"])


def test_additive_baseline_is_exact_on_additive_combos_only():
    data = _additive_world()
    train = ["ctrl", "A+ctrl", "B+ctrl", "C+ctrl"]
    pred = additive(data, train, ["A+B", "A+C"])
    np.testing.assert_allclose(pred["A+B"], data.mean("A+B"), atol=1e-5)
    per = evaluate_predictions(data, pred)
    assert per["A+B"]["pearson_delta"] == pytest.approx(1.0)
    assert per["A+C"]["pearson_delta"] < 0.9


def test_mean_shift_and_linear_baselines():
    data = _additive_world()
    train = ["ctrl", "A+ctrl", "B+ctrl", "C+ctrl"]
    ms = mean_shift(data, train, ["A+B"])["A+B"]
    expected = data.control_mean() + np.mean([data.mean(p) - data.control_mean() for p in train[1:]], axis=0)
    np.testing.assert_allclose(ms, expected)
    # Exactly additive training data that identifies intercept and weights (singles + one combo):
    # ridge with a tiny penalty recovers the additive combo it never saw.
    lin = linear(data, train + ["B+C"], ["A+B"], lam=1e-9)["A+B"]
    np.testing.assert_allclose(lin, data.mean("A+B"), atol=1e-3)
    # A gene never trained adds nothing: the prediction is the intercept (the mean training shift).
    lone = linear(data, ["ctrl", "A+ctrl", "B+ctrl"], ["C+ctrl"], lam=1e-9)["C+ctrl"]
    np.testing.assert_allclose(lone, data.control_mean() + np.mean(
        [data.mean(p) - data.control_mean() for p in ("A+ctrl", "B+ctrl")], axis=0), atol=1e-4)
    assert not math.isnan(float(lin.sum()))
