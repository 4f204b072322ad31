"""``METHOD-self`` for the tasks: the exact per-sample self-influence, or an embedding's for large sets."""

from __future__ import annotations

import numpy as np

from ..embedding import embed
from ._common import TaskInputs, TaskState, cached_score

SELF_EMBED_MIN_N = 2048
"""``METHOD-self`` of a sweep method on at least this many training samples (8 × ``SELF_EMBED_DIM``)
reads the self-influence from a trajectory influence embedding (:func:`diffin.embed`,
``SELF_EMBED_DIM`` directions of the ``SELF_EMBED_PROJECTION`` projection) instead of one exact
sweep per chunk of 64 samples: the exact path costs about N directions' HVPs per step, the
embedding K. Measured in BENCHMARKS.md ("Trajectory influence embeddings"): on mnist-captions
(N = 1,000) K = 256 cost 17.5 sweeps against about 320 for the exact path, mismatched-pair AUC
0.878 against 0.885; on mnist5k-mlp self-influence Spearman 0.996 against the exact one."""
SELF_EMBED_DIM = 256
SELF_EMBED_PROJECTION = "gradients"
SELF_EMBED_METHODS = ("diffin", "diffin-exact", "diffin-frozen", "diffin-expected")


def self_scores(inp: TaskInputs, state: TaskState, method: str, progress: bool) -> np.ndarray:
    """Self-influence (N,) of ``method`` (``METHOD-self``): the exact path (:func:`cached_score` with
    target ``"self"``) below :data:`SELF_EMBED_MIN_N` samples, above it the embedding's
    (saved in ``out/embedding-<method>`` and reused while run, data and config match)."""
    if method not in SELF_EMBED_METHODS or inp.n_train < SELF_EMBED_MIN_N:
        return cached_score(inp, state, method, "self", progress)
    folder = None if state.out is None else state.out / f"embedding-{method}"
    resume = folder is not None and (folder / ".embed").exists()
    emb = embed(state.run, inp.model_factory(), inp.loss_fn, train=inp.train, dim=SELF_EMBED_DIM,
                projection=SELF_EMBED_PROJECTION, method=method, out=folder, progress=progress, resume=resume)
    return emb.self_influence()
