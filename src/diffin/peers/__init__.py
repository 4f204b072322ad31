"""Peers: published data-attribution packages run on a diffin recording, in diffin's units.

    res = diffin.peers.run_peer("captum-tracincp", run=diffin.load_run("runs/x"),
                                model_factory=lambda: setup.model(d), loss_fn=setup.loss_fn,
                                train=(d.x_train, d.y_train), target=(d.x_val, d.y_val))
    res.scores   # (N,): predicted change of the mean target loss if each sample were removed

Each adapter calls the peer's own package (captum, kronfluence, traker, dattri; none is a
dependency of diffin: ``pip install 'diffin[peers]'``) with parameter values taken from the
run's checkpoints, and converts the output to diffin's sign and units. ``PeerResult.notes``
says exactly how; ``docs/peers.md`` lists the conversions and the options.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..recording.run import Run
from . import _captum, _dattri, _kronfluence, _trak  # noqa: F401 - registers the adapters
from ._base import LossFn, Peer, PeerResult, run_peer_impl


def available_peers() -> dict[str, str]:
    """Every adapter's name → ``"ok"`` when its package imports, else the import error text."""
    return {name: cls.import_error() or "ok" for name, cls in sorted(Peer.registry.items())}


def peer_units() -> dict[str, str]:
    """Adapter name → ``"loss"`` (scores predict the removal effect in loss units) or
    ``"rank-only"`` (scores order the samples but carry no unit)."""
    return {name: cls.units for name, cls in sorted(Peer.registry.items())}


def run_peer(
    name: str,
    *,
    run: Run | str | os.PathLike[str],
    model_factory: Callable[[], nn.Module],
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    target: tuple[Tensor, Tensor],
    verbose: bool = False,
    pairwise: bool = False,
    **options: Any,
) -> PeerResult:
    """Run one peer method on a recorded run; scores in diffin's sign and units.

    Args:
        name: an adapter name (:func:`available_peers`).
        run: the recorded run (:func:`diffin.load_run`) or its folder.
        model_factory: returns a fresh module of the trained architecture in the run's dtype;
            its initial values are never used (every parameter comes from a checkpoint).
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses; training minimised
            their batch mean.
        train: ``(inputs, targets)`` of the N training samples, indexed by the recorded ids.
        target: ``(inputs, targets)``; the target f is their mean loss.
        verbose: let the peer print its progress bars and warnings (by default they are
            silenced and the warnings kept in ``PeerResult.warnings``).
        pairwise: return (N, Q) scores, column q for target example q's own loss, instead of
            the (N,) scores for their mean.
        options: the adapter's options (see ``docs/peers.md``); unknown ones raise.

    Returns:
        :class:`PeerResult` with ``scores`` (N,) ≈ f(θ_T without z) − f(θ_T) (positive =
        helpful; (N, Q) with ``pairwise``), the seconds and peak RSS of the peer's run, and
        notes on the conversion.
    """
    return run_peer_impl(name, run=run, model_factory=model_factory, loss_fn=loss_fn, train=train,
                         target=target, verbose=verbose, pairwise=pairwise, **options)


__all__ = ["PeerResult", "available_peers", "peer_units", "run_peer"]
