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

from . import _captum, _dattri, _kronfluence, _trak  # noqa: F401 - registers the adapters
from ._base import Peer, PeerResult, run_peer


def available_peers() -> dict[str, str]:
    """Every adapter's name → ``"ok"`` when its package imports, else the import error text."""
    return {name: cls.import_error() or "ok" for name, cls in sorted(Peer.registry.items())}


def peer_units() -> dict[str, str]:
    """Adapter name → ``"loss"`` (scores predict the removal effect in loss units) or
    ``"rank-only"`` (scores order the samples but carry no unit)."""
    return {name: cls.units for name, cls in sorted(Peer.registry.items())}


__all__ = ["PeerResult", "available_peers", "peer_units", "run_peer"]
