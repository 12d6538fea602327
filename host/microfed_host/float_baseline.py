"""The reference task in float64 numpy: the yardstick for the Q16.16 model.

Same model (softmax regression, flat layout of ``microfed.model``), same initial parameters
(the Q16.16 init divided by 65536), same sample order (the portable ``XorShift32`` shuffle),
same batches and learning rate; only the arithmetic differs (float64, ``np.exp``). So the
accuracy gap between the two runs measures what fixed point costs, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from microfed import model as qmodel
from microfed import q16


class FloatSoftmax:
    """float64 twin of ``microfed.model.SoftmaxRegression``; params are a flat float array."""

    def __init__(self, n_features: int = 64, n_classes: int = 10) -> None:
        self.d = n_features
        self.k = n_classes
        self.n_params = n_features * n_classes + n_classes

    def init(self, seed: int) -> np.ndarray:
        raw = qmodel.SoftmaxRegression(self.d, self.k).init(seed)
        return from_raw(raw)

    def split(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bo = self.k * self.d
        return params[:bo].reshape(self.k, self.d), params[bo:]

    def logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        w, b = self.split(params)
        return x @ w.T + b

    def predict(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(params, x), axis=-1)

    def accuracy(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(params, x) == y))

    def train(
        self,
        params: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        lr: float,
        epochs: int,
        batch: int,
        seed: int,
    ) -> np.ndarray:
        """Mini-batch SGD on the mean cross-entropy, in the Q16.16 model's sample order."""
        p = params.astype(np.float64).copy()
        w, b = self.split(p)  # views into p
        rng = qmodel.XorShift32(seed)
        order = list(range(len(y)))
        onehot = np.eye(self.k)[y]
        for _ in range(epochs):
            rng.shuffle(order)
            for start in range(0, len(order), batch):
                idx = np.asarray(order[start : start + batch])
                xb = x[idx]
                z = xb @ w.T + b
                z -= z.max(axis=1, keepdims=True)
                e = np.exp(z)
                g = e / e.sum(axis=1, keepdims=True) - onehot[idx]
                w -= lr * (g.T @ xb) / len(idx)
                b -= lr * g.sum(axis=0) / len(idx)
        return p


def from_raw(raw: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(raw, dtype=np.float64) / q16.ONE


def features(raw_x: np.ndarray) -> np.ndarray:
    """Raw Q16.16 features (exact multiples of 1/16 for digits) as float64 values."""
    return from_raw(raw_x)
