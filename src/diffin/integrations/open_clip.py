"""open_clip models and their ``ClipLoss`` in diffin.

    open_clip = import_open_clip()                  # open_clip, importable with a CPU torch
    model = open_clip.CLIP(embed_dim=32, vision_cfg=..., text_cfg=...)
    loss = open_clip.ClipLoss()                     # the training loop's own loss
    ... train with loss(*model(images, tokens)), recorded by diffin.Recorder ...
    scores = diffin.influence(run, model, clip_batch_loss(loss),
                              train=((images, tokens), labels), target=((vi, vt), vl))

:func:`clip_batch_loss` is ``open_clip.ClipLoss`` with one weight per pair
(:func:`diffin.batch_loss`, docs/method.md §4.4): its logits come from the loss's own
``get_logits``, and with every weight 1 it is the loss the loop minimised, exactly; a weight 0
takes the pair out of the positives and out of every softmax denominator.

:func:`import_open_clip` exists for one reason: ``open_clip`` imports ``torchvision``, and PyPI's
Linux ``torchvision`` wheels are CUDA builds whose C++ operators do not load next to PyTorch's CPU
build. torchvision then fails at import (``RuntimeError: operator torchvision::nms does not
exist``: its ``_meta_registrations`` registers a fake kernel for ``nms`` whether or not the
operator library loaded). When that is the failure, the function declares the schemas of the two
operators whose fake kernels torchvision registers unconditionally (``torchvision::nms`` and
``torchvision::qnms``, as torchvision's own C++ declares them) and imports again: torchvision then
imports with ``torchvision.extension._has_ops()`` False, its transforms work, and its detection
operators (nms, roi_align, ...) raise torchvision's own "Couldn't load custom C++ ops" error if
called. open_clip's models and losses use none of them.

This module is the only one in diffin that imports ``open_clip`` (and ``torchvision``).
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .._errors import MissingExtraError
from .._functional import BatchLoss, batch_loss

log = logging.getLogger("diffin")

INSTALL = "pip install 'diffin[clip]'  (open_clip_torch and the torchvision matching torch==2.13.0, without --upgrade)"
_TV_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_tv_fragment: Any = None  # the torch.library fragment holding the declared schemas (kept alive)


def import_open_clip() -> ModuleType:
    """Import and return ``open_clip``; with a torchvision whose C++ operators do not load (a CUDA
    wheel next to a CPU torch), declare the operator schemas its import needs first (see the module
    docstring). Raises :class:`~diffin._errors.MissingExtraError` when open_clip or torchvision is
    not installed."""
    try:
        _import_torchvision()
        return importlib.import_module("open_clip")
    except ImportError as e:
        raise MissingExtraError(f"open_clip is not installed ({e}); {INSTALL}") from e


def _import_torchvision() -> ModuleType:
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
        _declare_torchvision_schemas()
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the failed import's half-initialised modules
        tv = importlib.import_module("torchvision")
        log.info("torchvision %s imported without its C++ operators (a CUDA build next to a CPU torch): "
                 "transforms work, detection operators do not; open_clip uses none of them", tv.__version__)
        return tv


def _declare_torchvision_schemas() -> None:
    global _tv_fragment
    if _tv_fragment is not None:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _TV_SCHEMAS.items():
        if not _has_op(name):
            lib.define(schema)
    _tv_fragment = lib


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name).default  # noqa: B018 - raises when the operator is unknown
    except (AttributeError, RuntimeError):
        return False
    return True


def clip_features(outputs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(image features (B, D), text features (B, D), logit scale, logit bias or None) from an
    open_clip model's output: its tuple ``(image, text, scale[, bias])`` or its ``output_dict``."""
    if isinstance(outputs, dict):
        return (outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                outputs.get("logit_bias"))
    if isinstance(outputs, (tuple, list)) and len(outputs) in (3, 4):
        return outputs[0], outputs[1], outputs[2], outputs[3] if len(outputs) == 4 else None
    raise TypeError(
        f"expected an open_clip CLIP output (image_features, text_features, logit_scale[, logit_bias]) or its "
        f"output_dict, got a {type(outputs).__name__}"
    )


def clip_batch_loss(loss: Any = None) -> BatchLoss:
    """``open_clip.ClipLoss`` (``loss``, default a new one) as a :func:`diffin.batch_loss`.

    The batch loss of B pairs with weights w (B,), logits from ``loss.get_logits`` (scale and bias
    included):  ½·Σ_i w_i·[(logsumexp_j(L_ij + log w_j) − L_ii) + (logsumexp_j(Lᵀ_ij + log w_j) − L_ii)] / B,
    equal to ``loss(image_features, text_features, logit_scale[, logit_bias])`` at w = 1. Targets
    are not read (pass any labels, e.g. ``torch.zeros(N)``). Single-process ClipLoss only (its
    ``world_size`` 1): the in-batch negatives of a gathered loss span several processes' batches.
    """
    if loss is None:
        loss = import_open_clip().ClipLoss()
    if getattr(loss, "world_size", 1) != 1:
        raise ValueError("clip_batch_loss needs a single-process ClipLoss (world_size=1)")

    def weighted(outputs: Any, _targets: Any, w: Tensor) -> Tensor:
        img, txt, scale, bias = clip_features(outputs)
        per_image, per_text = loss.get_logits(img, txt, scale, logit_bias=bias)
        logw = w.log()
        rows = torch.logsumexp(per_image + logw[None, :], dim=1) - per_image.diagonal()
        cols = torch.logsumexp(per_text + logw[None, :], dim=1) - per_text.diagonal()
        return 0.5 * (w * (rows + cols)).sum() / w.shape[0]

    return batch_loss(weighted)
