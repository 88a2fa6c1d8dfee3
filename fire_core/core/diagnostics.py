"""Plasticity diagnostics measured on activations, array API only.

FIRE's own measures (``sfe``, ``dfi``) look at weights. The two standard
measures of lost plasticity look at what a layer computes on a batch of data:

* ``srank(features)``: the feature effective rank of Kumar et al. 2021
  ("Implicit Under-Parameterization Inhibits Data-Efficient Deep Reinforcement
  Learning", ICLR 2021): with ``s_1 >= s_2 >= ...`` the singular values of a
  ``(batch, features)`` matrix, the smallest ``k`` with
  ``s_1 + ... + s_k >= (1 - delta) * (s_1 + s_2 + ...)``; ``delta = 0.01``
  as in the paper. A network that lost plasticity computes features of low
  srank (collapsed representations).
* ``dormant_ratio(activations)``: the share of tau-dormant units of Sokar et
  al. 2023 ("The Dormant Neuron Phenomenon in Deep Reinforcement Learning",
  ICML 2023, ReDo). A unit's score is its mean absolute activation over the
  batch divided by the layer's average of that quantity over its units; a unit
  is tau-dormant when its score is ``<= tau``. The paper recycles units with
  ``tau = 0.025`` in its default (DQN) setting and ``tau = 0.1`` in its
  Atari-100K setting; ``tau = 0`` counts only units that never fire. The
  default here is 0.025.

Both are read-outs, not training signals: they run eagerly on concrete arrays
(``srank`` needs an SVD, which is fine on a batch of features).
"""

from __future__ import annotations

from collections.abc import Sequence

from ._array import array_namespace, work_dtype

__all__ = ["srank", "dormant_scores", "dormant_ratio", "SRANK_DELTA", "DORMANT_TAU"]

SRANK_DELTA = 0.01  # Kumar et al. 2021
DORMANT_TAU = 0.025  # Sokar et al. 2023, default (DQN) setting


def srank(features, /, delta: float = SRANK_DELTA):
    """Effective rank of ``(..., batch, features)`` activations: an integer array of shape ``(...)``.

    The smallest ``k`` such that the ``k`` largest singular values hold at
    least ``1 - delta`` of the sum of all singular values (Kumar et al. 2021).
    An all-zero matrix has srank 0. ``delta`` must lie in ``[0, 1)``.
    """
    xp = array_namespace(features)
    if features.ndim < 2:
        raise ValueError(f"srank: expected (batch, features) activations, got shape {tuple(features.shape)}")
    if not 0.0 <= float(delta) < 1.0:
        raise ValueError(f"srank: delta must lie in [0, 1), got {delta!r}")
    x = xp.astype(features, work_dtype(features, xp, "srank"), copy=False)
    s = xp.linalg.svdvals(x)  # descending
    held = xp.cumulative_sum(s, axis=-1)
    total = held[..., -1:]
    # held is non-decreasing, so the first k reaching the threshold is one past
    # the number of partial sums still below it.
    k = xp.count_nonzero(held < (1.0 - float(delta)) * total, axis=-1) + 1
    return xp.where(total[..., 0] > 0, k, xp.zeros_like(k))


def dormant_scores(activations, /, *, axis: int = -1):
    """Sokar et al.'s unit scores: ``E|h_i| / mean_j E|h_j|``, one per unit along ``axis``.

    The expectation runs over every other axis (the batch, and the spatial
    positions of a conv feature map, so a channel is one unit: use ``axis=1``
    for torch's ``(N, C, H, W)``). A layer whose activations are all zero has
    every score 0 (every unit dormant).
    """
    xp = array_namespace(activations)
    h = activations
    if h.ndim < 2:
        raise ValueError(f"dormant_scores: expected (batch, units, ...) activations, got shape {tuple(h.shape)}")
    if not -h.ndim <= axis < h.ndim:
        raise ValueError(f"dormant_scores: axis {axis} out of range for shape {tuple(h.shape)}")
    h = xp.abs(xp.astype(h, work_dtype(h, xp, "dormant_scores"), copy=False))
    units = axis % h.ndim
    others = tuple(a for a in range(h.ndim) if a != units)
    mean_abs = xp.mean(h, axis=others)
    layer = xp.mean(mean_abs)
    ok = layer > 0
    return xp.where(ok, mean_abs / xp.where(ok, layer, xp.ones_like(layer)), xp.zeros_like(mean_abs))


def dormant_ratio(activations, /, tau: float = DORMANT_TAU, *, axis: int = -1):
    """Share of tau-dormant units (score ``<= tau``): a 0-d float array in ``[0, 1]``.

    ``activations`` is one layer's ``(batch, units, ...)`` array or a sequence
    of layers; for several layers the ratio is taken over all their units
    together (dormant units / units), as ReDo reports it for a network.
    """
    if float(tau) < 0:
        raise ValueError(f"dormant_ratio: tau must be >= 0, got {tau!r}")
    layers = list(activations) if isinstance(activations, Sequence) else [activations]
    if not layers:
        raise ValueError("dormant_ratio: no activations given")
    xp = array_namespace(*layers)
    scores = [dormant_scores(h, axis=axis) for h in layers]
    dormant = sum(xp.count_nonzero(s <= float(tau)) for s in scores)
    units = sum(s.shape[0] for s in scores)
    return xp.astype(dormant, scores[0].dtype) / units
