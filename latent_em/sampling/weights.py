"""Importance weights, thought selection, ELBO_k and effective sample size (DESIGN.md §4).

For one chunk with K candidate thoughts z_k drawn from q(z | P, X):
  log w_k = log p(z_k, X | P) - log q(z_k | P, X)
  ELBO_k  = logsumexp(log w_1..k) - log k      (a lower bound on log p(X | P), tighter as k grows)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import logsumexp

SELECTIONS = ("resample", "uniform", "argmax")


def log_weights(log_joint: np.ndarray, log_q: np.ndarray) -> np.ndarray:
  return np.asarray(log_joint, np.float64) - np.asarray(log_q, np.float64)


def normalized(log_w: np.ndarray) -> np.ndarray:
  """softmax(log w) along the last axis (probabilities of resampling each candidate)."""
  log_w = np.asarray(log_w, np.float64)
  return np.exp(log_w - logsumexp(log_w, axis=-1, keepdims=True))


def select(log_w: np.ndarray, method: str, rng: np.random.Generator) -> int:
  """Index of the kept thought among K candidates [K]."""
  if method == "resample":
    return int(rng.choice(len(log_w), p=normalized(log_w)))
  if method == "uniform":
    return int(rng.integers(len(log_w)))
  if method == "argmax":
    return int(np.argmax(log_w))
  raise ValueError(f"selection {method!r} is not one of {SELECTIONS}")


def elbo_k(log_w: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """ELBO_k = logsumexp(log w_1..k) - log k, for each k <= K (first k samples)."""
  log_w = np.asarray(log_w, np.float64)
  return {k: float(logsumexp(log_w[:k]) - np.log(k)) for k in ks if k <= len(log_w)}


def effective_sample_size(log_w: np.ndarray) -> float:
  """(sum w)^2 / sum w^2, in [1, K]."""
  p = normalized(log_w)
  return float(1.0 / np.sum(p * p))
