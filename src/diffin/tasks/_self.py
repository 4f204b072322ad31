"""``METHOD-self`` for the tasks: the exact per-sample self-influence, an embedding's for large sets, the
horizon self-influence (docs/method.md §4.11) for very large ones."""

from __future__ import annotations

import numpy as np

from .._errors import ConfigError, UnsupportedMethodError
from .._self_horizon import self_influence
from ..embedding import Embedding, embed
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
SELF_HORIZON_MIN_N = 100_000
"""From this many training samples ``METHOD-self`` of a sweep method is the horizon-0 self-influence
(:func:`diffin.self_influence`, sketched with ``SELF_HORIZON_DIM`` directions, standardised within
each batch) where the run allows it (batch ids recorded, no train-mode layers, no clipping). Measured in
BENCHMARKS.md ("Horizon self-influence at a million pairs"): on 100,000 pairs of ``scale-1m-pairs`` it
took 81 s with mismatched-pair AUC 0.654 (0.667 standardised) at K = 8, the K = 16 embedding 461 s and
0.558; at a million pairs K = 16 took 630 s and reached 0.725 standardised (the embedding would take
about 77 minutes)."""
SELF_HORIZON_DIM = 16


def self_scores(inp: TaskInputs, state: TaskState, method: str, progress: bool) -> np.ndarray:
    """Self-influence (N,) of ``method`` (``METHOD-self``): the exact path (:func:`cached_score` with
    target ``"self"``) below :data:`SELF_EMBED_MIN_N` samples, above it the embedding's
    (saved in ``out/embedding-<method>`` and reused while run, data and config match), from
    :data:`SELF_HORIZON_MIN_N` the horizon-0 self-influence standardised within each batch (unitless)
    on runs it supports."""
    if method not in SELF_EMBED_METHODS or inp.n_train < SELF_EMBED_MIN_N:
        return cached_score(inp, state, method, "self", progress)
    if inp.n_train >= SELF_HORIZON_MIN_N:
        try:
            return self_influence(state.run, inp.model_factory(), inp.loss_fn, train=inp.train, horizon=0,
                                  dim=SELF_HORIZON_DIM, progress=progress).standardized
        except (UnsupportedMethodError, ConfigError):  # train-mode layers, clipping, no batch ids
            pass
    return embedding_of(inp, state, method, progress).self_influence()


def embedding_of(inp: TaskInputs, state: TaskState, method: str, progress: bool) -> Embedding:
    """The trajectory influence embedding (N, ``SELF_EMBED_DIM``) of ``method`` (one of
    :data:`SELF_EMBED_METHODS`) with the ``SELF_EMBED_PROJECTION`` projection, saved in
    ``out/embedding-<method>`` and reused while run, data and config match (``METHOD-self`` and
    pruning's rule ``cover`` share it)."""
    if method not in SELF_EMBED_METHODS:
        raise ConfigError(f"{method!r} has no trajectory influence embedding; use one of {SELF_EMBED_METHODS}")
    folder = None if state.out is None else state.out / f"embedding-{method}"
    resume = folder is not None and (folder / ".embed").exists()
    return embed(state.run, inp.model_factory(), inp.loss_fn, train=inp.train, dim=SELF_EMBED_DIM,
                 projection=SELF_EMBED_PROJECTION, method=method, out=folder, progress=progress, resume=resume)
