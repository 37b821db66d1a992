"""kNN on features: synthetic features with known answers; numpy only."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bim_export.runtime import knn


def _clusters(n=400, dim=16, classes=5, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    return centres[y] + spread * rng.normal(size=(n, dim)), y


def test_knn_module_imports_without_torch():
    code = "import sys, bim_export.runtime.knn; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_knn_separable_clusters_is_perfect():
    x, y = _clusters()
    assert knn.knn_top1(x[:300], y[:300], x[300:], y[300:]) == 1.0


def test_knn_random_features_are_near_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2000, 32)), rng.integers(0, 4, 2000)
    acc = knn.knn_top1(x[:1500], y[:1500], x[1500:], y[1500:])
    assert 0.15 < acc < 0.35  # chance is 0.25


def test_knn_is_cosine_scale_invariant():
    x, y = _clusters(spread=0.8)
    scale = np.random.default_rng(2).uniform(0.01, 100, size=(len(x), 1))
    a = knn.knn_predict(x[:300], y[:300], x[300:])
    b = knn.knn_predict(x[:300] * scale[:300], y[:300], x[300:] * scale[300:])
    np.testing.assert_array_equal(a, b)


def test_knn_vote_is_similarity_weighted():
    # two close neighbours of class 0 outweigh three far ones of class 1 at k=5
    train = np.array([[1.0, 0.02], [1.0, -0.02], [0.5, 1.0], [0.4, 1.0], [0.45, 1.0]])
    labels = np.array([0, 0, 1, 1, 1])
    assert knn.knn_predict(train, labels, np.array([[1.0, 0.0]]), k=5).tolist() == [0]
    # with a very soft vote it is a plain majority
    assert knn.knn_predict(train, labels, np.array([[1.0, 0.0]]), k=5, temperature=100.0).tolist() == [1]


def test_knn_k_larger_than_train_set_and_chunking():
    x, y = _clusters(n=60)
    full = knn.knn_predict(x[:10], y[:10], x[10:], k=50)
    chunked = knn.knn_predict(x[:10], y[:10], x[10:], k=50, chunk=7)
    np.testing.assert_array_equal(full, chunked)


def test_knn_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        knn.knn_predict(np.zeros((4, 3)), np.zeros(4, int), np.zeros((2, 5)))


def test_knn_leave_one_out_never_counts_the_query_itself():
    x, y = _clusters()
    assert knn.knn_loo_top1(x, y) == 1.0
    rng = np.random.default_rng(5)
    xr, yr = rng.normal(size=(400, 8)), rng.integers(0, 4, 400)
    assert knn.knn_loo_top1(xr, yr, k=1) < 0.4  # with itself as a neighbour it would score 1.0
    assert knn.knn_top1(xr, yr, xr, yr, k=1) == 1.0

