"""fire_core: FIRE (Frobenius-Isometry REinitialization) for every array framework.

FIRE (Han et al., ICLR 2026) restores a network's plasticity at a shift in its
training data by replacing each weight matrix with (an approximation of) its
nearest orthogonal matrix, scaled to the layer's shape. The core here is
written once against the array API standard and runs on NumPy, PyTorch, JAX,
CuPy and any other compliant library; ``fire_core.torch``, ``fire_core.flax``
and ``fire_core.cupy`` map framework structures onto it.

>>> import numpy as np, fire_core
>>> w = np.random.default_rng(0).normal(size=(128, 64))
>>> new = fire_core.reinit(w, "oi", steps=5)          # a torch-Linear-shaped weight
>>> q = fire_core.project(w, 30, method="fast")       # the polar factor U V^T
>>> float(fire_core.dfi(q)) < 1e-20
True
"""

from .layout import from_matrices, to_matrices
from .metrics import dfi, sfe
from .plan import reinit, reinit_many
from .polar import METHODS, project
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "project",
    "reinit",
    "reinit_many",
    "to_matrices",
    "from_matrices",
    "sfe",
    "dfi",
    "Report",
    "METHODS",
    "__version__",
]
