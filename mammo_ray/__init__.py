"""mammo_ray: hyper-parameter sweeps for breast-cancer classifiers on mammograms, on Ray."""

from __future__ import annotations

__version__ = "0.1.0"
