"""Early exit's confidence thresholds: the exit rule, and the fit against an exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bim_export.deploy.thresholds import fit_thresholds
from bim_export.runtime.early_exit import confidence, exit_index


def _problem(seed: int, n: int = 30, exits: int = 3, classes: int = 4):
    """Logits whose deeper exits are right more often, with confidence that tracks it loosely."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = []
    for k in range(exits):
        z = rng.normal(0, 1, (n, classes))
        right = rng.random(n) < 0.5 + 0.2 * k
        z[np.arange(n), np.where(right, y, (y + 1) % classes)] += rng.uniform(0.5, 4, n)
        logits.append(z)
    return logits, y


def _cost_and_accuracy(logits, y, costs, thresholds):
    conf = np.stack([confidence(z) for z in logits])
    idx = exit_index(conf, thresholds)
    correct = np.stack([z.argmax(1) == y for z in logits])
    return float(np.cumsum(costs)[idx].mean()), int(correct[idx, np.arange(len(y))].sum())


def test_exit_index_takes_the_first_confident_exit_and_the_last_takes_the_rest():
    conf = np.array([[0.9, 0.5, 0.5, 0.95],
                     [0.1, 0.8, 0.5, 0.99],
                     [0.2, 0.2, 0.2, 0.2]])
    assert exit_index(conf, [0.9, 0.8, 0.0]).tolist() == [0, 1, 2, 0]
    assert exit_index(conf, [None, 0.8, 0.0]).tolist() == [2, 1, 2, 1]  # None: nobody leaves there
    assert exit_index(conf, [None, None, 0.0]).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_fit_finds_the_cheapest_thresholds_within_the_loss(seed, loss):
    logits, y = _problem(seed)
    costs = [2.0, 1.0, 3.0]
    fit = fit_thresholds(logits, y, costs, loss)
    deepest = int((logits[-1].argmax(1) == y).sum())
    needed = deepest - int(np.floor(loss * len(y) + 1e-9))
    cost, right = _cost_and_accuracy(logits, y, costs, fit.thresholds)
    assert right >= needed and fit.accuracy == pytest.approx(right / len(y)) and fit.cost == pytest.approx(cost)
    # exhaustive: every confidence value of each early exit (and never) as its threshold
    grids = [sorted(set(confidence(z))) + [None] for z in logits[:-1]]
    best = min(c for c, r in (_cost_and_accuracy(logits, y, costs, [*t, 0.0]) for t in itertools.product(*grids))
               if r >= needed)
    assert fit.cost == pytest.approx(best)
    assert fit.fixed_cost == [2.0, 3.0, 6.0] and sum(fit.exit_share) == pytest.approx(1.0)


def test_fit_with_no_loss_allowed_keeps_the_deepest_accuracy_and_with_any_loss_exits_first():
    logits, y = _problem(3, n=50)
    strict = fit_thresholds(logits, y, [1, 1, 1], 0.0)
    assert strict.accuracy >= strict.fixed_accuracy[-1] and strict.thresholds[-1] == 0.0
    loose = fit_thresholds(logits, y, [1, 1, 1], 1.0)
    assert loose.exit_share[0] == 1.0 and loose.cost == 1.0 and loose.accuracy == loose.fixed_accuracy[0]


def test_fit_of_one_exit_is_that_exit():
    logits, y = _problem(4, exits=1)
    fit = fit_thresholds(logits, y, [5.0], 0.005)
    assert fit.thresholds == [0.0] and fit.exit_share == [1.0] and fit.accuracy == fit.fixed_accuracy[0]
