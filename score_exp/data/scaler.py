"""Train-split preprocessing of a descriptor matrix (:class:`FeatureScaler`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from score_exp.errors import DataError


@dataclass
class FeatureScaler:
    """Train-split preprocessing of a descriptor matrix.

    Columns that are constant or entirely non-finite on the training split are dropped; other
    missing values are imputed with the training median; features are standardised with the
    training mean/std and clipped to ``[-clip, clip]`` (a few RDKit descriptors, e.g. ``Ipc``,
    have extreme tails).
    """

    keep: np.ndarray
    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    clip: float = 10.0

    @classmethod
    def fit(cls, X_train: np.ndarray, clip: float = 10.0) -> FeatureScaler:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: dropped below
            finite = np.isfinite(X_train)
            has_any = finite.any(axis=0)
            median = np.where(has_any, np.nanmedian(np.where(finite, X_train, np.nan), axis=0), 0.0)
            filled = np.where(finite, X_train, median)
            std = filled.std(axis=0)
        keep = has_any & (std > 1e-12)
        if not keep.any():
            raise DataError(
                f"no descriptor varies over the {len(X_train)} training molecules (all "
                f"{X_train.shape[1]} columns constant or missing: are the molecules all the "
                "same?); there is nothing to learn from"
            )
        return cls(
            keep=keep,
            median=median[keep],
            mean=filled[:, keep].mean(axis=0),
            std=std[keep],
            clip=clip,
        )

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = X[:, self.keep]
        X = np.where(np.isfinite(X), X, self.median)
        return np.clip((X - self.mean) / self.std, -self.clip, self.clip).astype(np.float32)

    @property
    def n_features(self) -> int:
        return int(self.keep.sum())
