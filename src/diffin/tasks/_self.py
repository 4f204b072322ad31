"""Self-influence for the tasks (``METHOD-self``): the exact path on small sets, a trajectory
influence embedding's on large ones."""

from __future__ import annotations

import numpy as np

from ._common import TaskInputs, TaskState, cached_score

SELF_EMBED_MIN_N = 5000
"""``METHOD-self`` of a sweep method on at least this many training samples reads the self-influence
from a trajectory influence embedding (:func:`diffin.embed`, ``SELF_EMBED_DIM`` directions of the
``SELF_EMBED_PROJECTION`` projection) instead of one exact sweep per chunk of 64 samples: the exact
path costs about N directions' HVPs per step, the embedding K (measured in BENCHMARKS.md,
"Trajectory influence embeddings")."""
SELF_EMBED_DIM = 256
SELF_EMBED_PROJECTION = "gradients"
SELF_EMBED_METHODS = ("diffin", "diffin-exact", "diffin-frozen", "diffin-expected")


def self_scores(inp: TaskInputs, state: TaskState, method: str, progress: bool) -> np.ndarray:
    """Self-influence (N,) of ``method`` (``METHOD-self``): the exact path (:func:`cached_score` with
    target ``"self"``) below :data:`SELF_EMBED_MIN_N` samples, above it the embedding's
    (saved in ``out/embedding-<method>`` and reused while run, data and config match)."""
    if method not in SELF_EMBED_METHODS or inp.n_train < SELF_EMBED_MIN_N:
        return cached_score(inp, state, method, "self", progress)
    from ..embedding import embed

    folder = None if state.out is None else state.out / f"embedding-{method}"
    resume = folder is not None and (folder / ".embed").exists()
    emb = embed(state.run, inp.model_factory(), inp.loss_fn, train=inp.train, dim=SELF_EMBED_DIM,
                projection=SELF_EMBED_PROJECTION, method=method, out=folder, progress=progress, resume=resume)
    return emb.self_influence()
