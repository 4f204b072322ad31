"""The manifest schema of a run folder and the optimizer description it carries."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import CorruptManifestError

_NOT_HYPER = frozenset({"params", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable"})
"""Param-group keys that are not hyper-parameters of the update: the parameters, the learning rate
(recorded per step), the schedulers' bookkeeping and implementation switches that do not change the
values computed."""

_SGD_HYPER = ("momentum", "dampening", "nesterov", "weight_decay", "maximize")


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of a recorded run: its torch class name and its parameter groups.

    ``groups``: one entry per torch param group, in order: ``{"params": [trainable parameter
    names], "hyper": {hyper-parameter: value}}`` with every hyper-parameter of the group except the
    learning rate (which is recorded at every step, ``Run.group_lrs``): e.g. ``momentum``,
    ``dampening``, ``nesterov``, ``weight_decay``, ``maximize`` for SGD; ``beta1``, ``beta2`` (torch's
    ``betas``), ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``, ``decoupled_weight_decay`` for
    Adam / AdamW. Runs recorded before groups were stored load as one group holding every trainable
    parameter, with the scalar fields below as its hyper-parameters, when their groups were uniform;
    otherwise (their groups' settings were not saved) ``groups`` is empty.

    The scalar fields (``momentum`` … ``maximize``) are group 0's, kept for runs written before
    groups were stored (the update itself is :mod:`diffin.trajectory.optim`); ``uniform_groups``
    says whether every group had the same hyper-parameters and learning rate when recording
    started. ``assumed``: no optimizer was
    given to the recorder (plain SGD with the per-step learning rates is assumed).

    PyTorch SGD (``torch.optim.SGD``) is modelled exactly:
    ``g = G_B(θ) + λθ``; ``v' = μv + a·g`` (``a = 1`` on the optimizer's very first step, else
    ``1 − dampening``); ``θ' = θ − η·(g + μv')`` with Nesterov, else ``θ' = θ − η·v'``.
    """

    kind: str = "SGD"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    uniform_groups: bool = True
    assumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_sgd(self) -> bool:
        return self.kind == "SGD" and not self.maximize and self.uniform_groups

    @classmethod
    def from_optimizer(cls, opt: torch.optim.Optimizer | None, model: nn.Module | None = None) -> OptimizerSpec:
        """Describe ``opt``; with ``model``, its groups name the parameters they hold (without an
        optimizer: one group of the model's parameters that require grad)."""
        if opt is None:
            groups = []
            if model is not None:
                names = [n for n, p in model.named_parameters() if p.requires_grad]
                groups = [{"params": names, "hyper": {k: _SGD_DEFAULTS[k] for k in _SGD_HYPER}}]
            return cls(assumed=True, groups=groups)
        kind = type(opt).__name__
        pgroups = opt.param_groups
        g0 = pgroups[0]
        hypers = group_hypers(opt)
        uniform = all(h == hypers[0] for h in hypers) and len({float(g["lr"]) for g in pgroups}) == 1
        groups: list[dict[str, Any]] = []
        if model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            groups = [
                {"params": [names[id(p)] for p in g["params"] if id(p) in names], "hyper": h}
                for g, h in zip(pgroups, hypers)
            ]
        if kind == "SGD":
            return cls(
                kind=kind,
                momentum=float(g0.get("momentum", 0.0)),
                dampening=float(g0.get("dampening", 0.0)),
                nesterov=bool(g0.get("nesterov", False)),
                weight_decay=float(g0.get("weight_decay", 0.0)),
                maximize=bool(g0.get("maximize", False)),
                uniform_groups=uniform,
                groups=groups,
            )
        extra = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in g0.items()
            if k not in _NOT_HYPER and isinstance(v, (int, float, bool, tuple, str))
        }
        return cls(
            kind=kind,
            weight_decay=float(g0.get("weight_decay", 0.0)),
            maximize=bool(g0.get("maximize", False)),
            uniform_groups=uniform,
            extra=extra,
            groups=groups,
        )

    def same_optimizer(self, other: OptimizerSpec) -> bool:
        """Whether ``other`` describes the same update: class, groups and their hyper-parameters
        (learning rates and the informative fields aside)."""
        return (self.kind, self.assumed, self.groups) == (other.kind, other.assumed, other.groups)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], trainable: list[str] | None = None) -> OptimizerSpec:
        """Read the manifest's optimizer entry. An entry without ``groups`` (written before groups
        were recorded) gets one implicit group of ``trainable`` (when given) if its groups were
        uniform; otherwise its groups are unknown and stay empty."""
        try:
            spec = cls(**d)
        except TypeError as e:
            raise CorruptManifestError(f"optimizer entry of the manifest is malformed: {e}") from e
        if not isinstance(spec.groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and isinstance(g.get("hyper"), dict)
            for g in spec.groups
        ):
            raise CorruptManifestError(
                "optimizer entry of the manifest is malformed: groups must be a list of "
                '{"params": [...], "hyper": {...}}; the file is damaged'
            )
        if not spec.groups and trainable is not None and spec.uniform_groups:
            spec = replace(spec, groups=[{"params": list(trainable), "hyper": spec._implicit_hyper()}])
        return spec

    def _implicit_hyper(self) -> dict[str, Any]:
        """The hyper-parameters of the one group of a run recorded before groups were stored."""
        if self.kind == "SGD" or self.assumed:
            return {k: getattr(self, k) for k in _SGD_HYPER}
        hyper = _hyper_items({k: tuple(v) if isinstance(v, list) else v for k, v in self.extra.items()})
        hyper.setdefault("weight_decay", self.weight_decay)
        if self.kind == "AdamW":
            hyper.setdefault("decoupled_weight_decay", True)
        return hyper


_SGD_DEFAULTS: dict[str, Any] = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0,
                                 "maximize": False}


def group_hypers(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every param group's hyper-parameters (JSON values), in group order: the keys of the
    optimizer's ``defaults`` except the learning rate and implementation switches; ``betas`` is
    split into ``beta1`` / ``beta2``; ``AdamW`` always carries ``decoupled_weight_decay: True``."""
    keys = [k for k in opt.defaults if k not in _NOT_HYPER]
    out = []
    for g in opt.param_groups:
        hyper = _hyper_items({k: g[k] for k in keys if k in g})
        if type(opt).__name__ == "AdamW":
            hyper.setdefault("decoupled_weight_decay", True)
        out.append(hyper)
    return out


def _hyper_items(items: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in items.items():
        if k in _NOT_HYPER:
            continue
        v = _json_scalar(v)
        if k == "betas" and isinstance(v, list) and len(v) == 2:
            out["beta1"], out["beta2"] = v
        elif v is not _SKIP:
            out[k] = v
    return out


_SKIP = object()


def _json_scalar(v: Any) -> Any:
    """``v`` as a JSON value (bool/int/float/str/None, or a list of numbers), else ``_SKIP``."""
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 else _SKIP
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (tuple, list)):
        vals = [_json_scalar(x) for x in v]
        return vals if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals) else _SKIP
    return _SKIP


REQUIRED_KEYS = ("format_version", "n_steps", "checkpoints", "model", "optimizer", "lrs")


def check_manifest(m: dict[str, Any], where: str) -> None:
    """Check the types of every manifest entry the loader reads (``where`` names the file), so
    that a damaged or crafted manifest is a :class:`CorruptManifestError` naming the entry, never
    an error from deep inside the loader. Values (sizes, hashes, steps against each other) are
    checked where they are used."""

    def bad(what: str, value: Any, want: str) -> CorruptManifestError:
        return CorruptManifestError(f"{where}: {what} must be {want}, got {value!r:.120}; the manifest is damaged")

    def count(what: str, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad(what, v, "an integer >= 0")
        return v

    def names(what: str, v: Any) -> list[str]:
        if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
            raise bad(what, v, "a list of names")
        return v

    def obj(what: str, v: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise bad(what, v, "an object")
        return v

    def log(what: str, v: Any) -> None:
        e = obj(what, v)
        if "count" in e:
            count(f"{what}.count", e["count"])
        if "bytes" in e:
            count(f"{what}.bytes", e["bytes"])
        for k in ("dtype", "sha256"):
            if k in e and not isinstance(e[k], str):
                raise bad(f"{what}.{k}", e[k], "a string")

    count("n_steps", m["n_steps"])
    if not isinstance(m.get("status", ""), str):
        raise bad("status", m["status"], "a string")
    if m.get("interrupted") is not None:
        obj("interrupted", m["interrupted"])
    model = obj("model", m["model"])
    names("model.trainable", model.get("trainable"))
    params = model.get("parameters")
    if not isinstance(params, list):
        raise bad("model.parameters", params, "a list")
    for i, p in enumerate(params):
        p = obj(f"model.parameters[{i}]", p)
        if not isinstance(p.get("name"), str):
            raise bad(f"model.parameters[{i}].name", p.get("name"), "a string")
        shape = p.get("shape")
        if not isinstance(shape, list):
            raise bad(f"model.parameters[{i}].shape", shape, "a list of sizes")
        for s in shape:
            count(f"model.parameters[{i}].shape", s)
    dtype = model.get("dtype")
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise bad("model.dtype", dtype, "a torch dtype name such as 'float32'")
    ckpts = m["checkpoints"]
    if not isinstance(ckpts, list):
        raise bad("checkpoints", ckpts, "a list")
    for i, c in enumerate(ckpts):
        c = obj(f"checkpoints[{i}]", c)
        count(f"checkpoints[{i}].step", c.get("step"))
        count(f"checkpoints[{i}].bytes", c.get("bytes"))
        if "optimizer_step" in c and c["optimizer_step"] is not None:
            count(f"checkpoints[{i}].optimizer_step", c["optimizer_step"])
        if not isinstance(c.get("has_momentum", False), bool):
            raise bad(f"checkpoints[{i}].has_momentum", c["has_momentum"], "true or false")
        if c.get("optimizer_state_missing") is not None:
            names(f"checkpoints[{i}].optimizer_state_missing", c["optimizer_state_missing"])
    opt = obj("optimizer", m["optimizer"])
    if not isinstance(opt.get("kind", "SGD"), str):
        raise bad("optimizer.kind", opt["kind"], "a string")
    groups = opt.get("groups", [])
    for i, g in enumerate(groups if isinstance(groups, list) else []):  # the rest: OptimizerSpec.from_json
        if isinstance(g, dict) and "params" in g:
            names(f"optimizer.groups[{i}].params", g["params"])
    log("lrs", m["lrs"])
    bi = obj("batch_ids", m.get("batch_ids", {"recorded": False}))
    if not isinstance(bi.get("recorded", False), bool):
        raise bad("batch_ids.recorded", bi["recorded"], "true or false")
    if bi.get("recorded"):
        for k in ("ids", "offsets"):
            log(f"batch_ids.{k}", bi.get(k))
        if "max_id" in bi and (not isinstance(bi["max_id"], int) or isinstance(bi["max_id"], bool)):
            raise bad("batch_ids.max_id", bi["max_id"], "an integer")
        sizes = bi.get("batch_sizes", [])
        if not isinstance(sizes, list):
            raise bad("batch_ids.batch_sizes", sizes, "a list of sizes")
        for size in sizes:
            count("batch_ids.batch_sizes", size)
    if m.get("n_train") is not None:
        count("n_train", m["n_train"])
    rng = obj("rng_states", m.get("rng_states", {"recorded": False}))
    if not isinstance(rng.get("recorded", False), bool):
        raise bad("rng_states.recorded", rng["recorded"], "true or false")
    if rng.get("recorded"):
        count("rng_states.cpu_bytes", rng.get("cpu_bytes"))
        count("rng_states.cuda_bytes", rng.get("cuda_bytes"))
        log("rng_states.log", rng.get("log"))



def frozen_fingerprint(model: nn.Module, trainable: list[str]) -> str | None:
    """sha256 of the parameters of ``model`` outside ``trainable`` (names, shapes and values as float64,
    so an exact up-cast matches); None when every parameter trains."""
    keep = set(trainable)
    h = hashlib.sha256()
    n = 0
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name in keep:
            continue
        n += 1
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(memoryview(p.detach().to("cpu", torch.float64).contiguous().reshape(-1).numpy().view(np.uint8)))
    return h.hexdigest() if n else None
