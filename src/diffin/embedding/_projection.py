"""The random projection R (K × P') of a trajectory influence embedding (docs/method.md §4.10).

P' = P (the trained parameters, in the run's flat order) plus, for a run whose BatchNorm layers
trained in training mode, the R running statistics (docs/method.md §4.8) that an eval-mode target
reads: the sweep's adjoint lives in (θ, r), so the projection does too.

Kinds:

* ``gaussian`` (default) and ``rademacher``: i.i.d. entries of variance 1/K, so E[RᵀR] = I and
  ⟨R a, R b⟩ is an unbiased estimate of ⟨a, b⟩ (Johnson–Lindenstrauss). Row k is drawn from its
  own generator ``numpy.random.default_rng([seed, k])``: the rows do not depend on how they are
  chunked, and any row can be regenerated at query time from (kind, seed, k) alone.
* ``gradients``: data-dependent: the dominant K-dimensional subspace of the training samples'
  gradients at θ_T (orthonormal rows, :mod:`._basis`), stored beside the embedding
  (``projection.npy``). Exact for target gradients inside the subspace; K is capped at N.
* ``identity``: K = P', R = I (exact: the embedding holds every coordinate of e_z).
* ``orthogonal``: K = P', R a random orthogonal matrix (RᵀR = I exactly; for tests and small P').

``dim >= P'`` always gives an exact projection (identity unless ``orthogonal`` was asked for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._errors import ConfigError

PROJECTIONS = ("gaussian", "rademacher", "gradients", "identity", "orthogonal")
BASIS_NPY = "projection.npy"
"""The rows of a ``gradients`` projection (K × P'), beside the embedding."""
ORTHOGONAL_MAX = 8192
"""Largest P' for ``orthogonal`` (a dense P'×P' QR)."""


@dataclass
class Projection:
    """R (``dim`` × ``n_params + n_stats``), regenerated from ``kind`` and ``seed``.

    ``cache_mb``: R is kept in memory after its first use when it fits (else rows are regenerated
    per use, in chunks of ``rows_per_chunk``)."""

    kind: str
    dim: int
    n_params: int
    n_stats: int = 0
    seed: int = 0
    cache_mb: float = 512.0
    basis: Tensor | None = field(default=None, repr=False)
    """The rows of a ``gradients`` projection (K, P'), float64."""
    _cache: dict[tuple[torch.dtype, str], Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS}, got {self.kind!r}")
        if int(self.dim) < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        full = self.width
        if self.kind in ("identity", "orthogonal") or self.dim >= full:
            if self.kind not in ("identity", "orthogonal"):
                self.kind = "identity"
            self.dim = full
        if self.kind == "orthogonal" and full > ORTHOGONAL_MAX:
            raise ConfigError(
                f"projection='orthogonal' builds a dense {full} x {full} matrix (limit {ORTHOGONAL_MAX}); use "
                "'identity' for an exact embedding of a larger model"
            )

    @classmethod
    def make(cls, kind: str, dim: int, n_params: int, n_stats: int = 0, seed: int = 0) -> Projection:
        return cls(kind=kind, dim=int(dim), n_params=int(n_params), n_stats=int(n_stats), seed=int(seed))

    @property
    def width(self) -> int:
        """P' = parameters + running statistics."""
        return self.n_params + self.n_stats

    @property
    def exact(self) -> bool:
        """RᵀR = I exactly (identity or orthogonal): embedding scores equal the sweep's."""
        return self.kind in ("identity", "orthogonal")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "n_params": self.n_params, "n_stats": self.n_stats,
                "seed": self.seed, "scale": self.scale, **({"basis": BASIS_NPY} if self.kind == "gradients" else {}),
                "rows": "row k: numpy.random.default_rng([seed, k]) draws, times scale (gaussian: standard_normal; "
                        "rademacher: +-1); columns: the trained parameters in the run's flat order, then the "
                        "running statistics of train-mode BatchNorm layers"}

    @classmethod
    def from_json(cls, d: dict[str, Any], basis: Tensor | None = None) -> Projection:
        p = cls.make(d["kind"], d["dim"], d["n_params"], d.get("n_stats", 0), d.get("seed", 0))
        if p.kind == "gradients":
            p.set_basis(basis)
        return p

    def set_basis(self, basis: Tensor | None) -> None:
        """Install the rows of a ``gradients`` projection (K ≤ dim rows); K becomes ``len(basis)``."""
        if basis is None or basis.ndim != 2 or basis.shape[1] != self.width:
            raise ConfigError(f"a 'gradients' projection needs its rows ({BASIS_NPY}, K x {self.width})")
        self.basis = basis.to(torch.float64)
        self.dim = int(basis.shape[0])
        self._cache.clear()

    @property
    def scale(self) -> float:
        return 1.0 if self.exact or self.kind == "gradients" else 1.0 / math.sqrt(self.dim)

    # ------------------------------------------------------------------ rows
    def rows(self, k0: int, k1: int, dtype: torch.dtype = torch.float64, device: Any = "cpu") -> Tensor:
        """Rows k0..k1−1 of R, shape (k1 − k0, P')."""
        full = self._cached(dtype, device)
        if full is not None:
            return full[k0:k1]
        return self._make(k0, k1, dtype, device)

    def _make(self, k0: int, k1: int, dtype: torch.dtype, device: Any) -> Tensor:
        P = self.width
        if self.kind == "gradients":
            if self.basis is None:
                raise ConfigError("this 'gradients' projection has no rows yet (Projection.set_basis)")
            return self.basis[k0:k1].to(dtype=dtype, device=device)
        if self.kind == "identity":
            out = torch.zeros(k1 - k0, P, dtype=dtype, device=device)
            out[torch.arange(k1 - k0), torch.arange(k0, k1)] = 1
            return out
        if self.kind == "orthogonal":
            g = np.random.default_rng([self.seed, P])
            q, r = np.linalg.qr(g.standard_normal((P, P)))
            q *= np.sign(np.diag(r))  # Haar-distributed
            return torch.as_tensor(q[k0:k1], dtype=dtype, device=device)
        block = np.empty((k1 - k0, P), dtype=np.float64)
        for i, k in enumerate(range(k0, k1)):
            g = np.random.default_rng([self.seed, k])
            if self.kind == "gaussian":
                block[i] = g.standard_normal(P)
            else:
                block[i] = g.integers(0, 2, P, dtype=np.int8) * 2.0 - 1.0
        block *= self.scale
        return torch.as_tensor(block, dtype=dtype, device=device)

    def _cached(self, dtype: torch.dtype, device: Any) -> Tensor | None:
        key = (dtype, str(device))
        if key in self._cache:
            return self._cache[key]
        nbytes = self.dim * self.width * torch.empty(0, dtype=dtype).element_size()
        if nbytes > self.cache_mb * 2**20:
            return None
        self._cache[key] = self._make(0, self.dim, dtype, device)
        return self._cache[key]

    def chunks(self, dtype: torch.dtype, device: Any, rows_per_chunk: int | None = None
               ) -> list[tuple[int, int]]:
        """Row ranges covering R whose blocks fit in ``cache_mb`` (one range when R is cached)."""
        if rows_per_chunk is None:
            per_row = self.width * torch.empty(0, dtype=dtype).element_size()
            rows_per_chunk = max(1, int(self.cache_mb * 2**20 // max(per_row, 1)))
        return [(k, min(k + rows_per_chunk, self.dim)) for k in range(0, self.dim, rows_per_chunk)]

    def split(self, M: Tensor) -> tuple[Tensor, Tensor]:
        """(…, P') → the parameter part (…, P) and the statistics part (…, R)."""
        return M[..., : self.n_params], M[..., self.n_params:]

    def apply(self, G: Tensor) -> Tensor:
        """R G: G (Q, P') → (Q, K), in G's dtype (identity: G itself)."""
        if G.shape[-1] != self.width:
            raise ConfigError(f"a gradient of width {G.shape[-1]} cannot be projected by R of width {self.width}")
        if self.kind == "identity":
            return G.clone()
        parts = [G @ self.rows(k0, k1, G.dtype, G.device).T for k0, k1 in self.chunks(G.dtype, G.device)]
        return torch.cat(parts, dim=-1)
