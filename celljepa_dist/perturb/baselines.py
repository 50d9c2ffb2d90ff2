"""Simple perturbation baselines, reported beside every model (the paper skipped them; published
benchmarks find them hard to beat). Each maps a test condition to a predicted mean cell [G] from
the *training* perturbations only; c is the mean control cell, s_p = mean(p) - c the shift of p.

    control_mean   c: no change at all (delta 0, so every delta Pearson is 0 by GEARS' NaN rule)
    mean_shift     c + mean over training perturbations of s_p
    additive       c + s_A + s_B for a combo A+B, s_g the shift of the training single of g;
                   a gene with no training single contributes the mean single shift instead
                   (so an unseen single is predicted as c + mean single shift)
    linear         ridge regression of s_p on the perturbation flags (one column per training
                   gene, plus an intercept): c + b + sum_g W_g; genes never trained add nothing
"""
from __future__ import annotations

import numpy as np

from .gears_data import CTRL, GearsData, parse_condition

BASELINES = ("control_mean", "mean_shift", "additive", "linear")
RIDGE_LAMBDA = 0.1


def _shifts(data: GearsData, perts: list[str], ctrl: np.ndarray) -> dict[str, np.ndarray]:
    return {p: data.mean(p) - ctrl for p in perts}


def control_mean(data: GearsData, train: list[str], test: list[str]) -> dict[str, np.ndarray]:
    ctrl = data.control_mean()
    return {p: ctrl.copy() for p in test}


def mean_shift(data: GearsData, train: list[str], test: list[str]) -> dict[str, np.ndarray]:
    ctrl = data.control_mean()
    perts = [p for p in train if p != CTRL]
    shift = np.mean(list(_shifts(data, perts, ctrl).values()), axis=0)
    return {p: ctrl + shift for p in test}


def additive(data: GearsData, train: list[str], test: list[str]) -> dict[str, np.ndarray]:
    ctrl = data.control_mean()
    singles = [p for p in train if p != CTRL and len(parse_condition(p)) == 1]
    by_gene = {parse_condition(p)[0]: s for p, s in _shifts(data, singles, ctrl).items()}
    fallback = np.mean(list(by_gene.values()), axis=0) if by_gene else np.zeros_like(ctrl)
    return {p: ctrl + sum(by_gene.get(g, fallback) for g in parse_condition(p)) for p in test}


def linear(data: GearsData, train: list[str], test: list[str], lam: float = RIDGE_LAMBDA) -> dict[str, np.ndarray]:
    ctrl = data.control_mean()
    perts = [p for p in train if p != CTRL]
    genes = sorted({g for p in perts for g in parse_condition(p)})
    col = {g: i for i, g in enumerate(genes)}
    F = np.zeros((len(perts), len(genes)))
    for r, p in enumerate(perts):
        F[r, [col[g] for g in parse_condition(p)]] = 1.0
    Y = np.stack(list(_shifts(data, perts, ctrl).values()))
    # Centre both sides so the intercept is not penalised: b = mean(Y) - mean(F) W.
    f_mean, y_mean = F.mean(axis=0), Y.mean(axis=0)
    Fc, Yc = F - f_mean, Y - y_mean
    W = np.linalg.solve(Fc.T @ Fc + lam * np.eye(len(genes)), Fc.T @ Yc)
    b = y_mean - f_mean @ W
    out = {}
    for p in test:
        flags = np.zeros(len(genes))
        for g in parse_condition(p):
            if g in col:
                flags[col[g]] = 1.0
        out[p] = ctrl + b + flags @ W
    return out


def predict_baselines(data: GearsData, train: list[str], test: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """baseline name -> condition -> predicted mean cell, for every baseline of BASELINES."""
    fns = {"control_mean": control_mean, "mean_shift": mean_shift, "additive": additive, "linear": linear}
    return {name: fns[name](data, train, test) for name in BASELINES}
