"""The optimizer-rule protocol: one training step on flat parameters and its adjoint.

A rule describes one ``torch.optim`` class exactly, on the flattened trainable parameters θ (P,)
and the optimizer's state (a dict of flat tensors), with every hyper-parameter either a float or
a per-coordinate vector (P,) (parameter groups with their own learning rate, weight decay or
betas become vectors). Tensors may carry a leading batch dimension (K, P): ground truth advances
K runs side by side with the same rule.

The sweep needs two things from a step S: (θ, s, g) → (θ', s') (docs/method.md §4.3):

* :meth:`OptimizerRule.step`: the forward step, given the (already clipped) batch gradient g of
  the mean loss (weight decay is the rule's business, coupled or decoupled);
* :meth:`OptimizerRule.adjoint`: the transpose of the step's linearisation. From the adjoint
  (θ̄', s̄') of the step's output it returns ``w`` (the coefficient of g: a sample's removal
  changes f by ⟨w, Δg⟩), the part of θ̄ that does not go through g's dependence on θ (decay
  terms included), and s̄. The caller adds the batch Hessian term H_B(θ)·w to θ̄.

Adding an optimizer = one module with a subclass (it registers itself by ``kinds``), its tests,
and nothing else.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..._errors import UnsupportedOptimizerError

State = dict[str, Tensor]
Scalar = float | Tensor  # a float or a per-coordinate vector (P,)


class OptimizerRule:
    """Base class; subclasses set ``kinds`` (the ``torch.optim`` class names they model)."""

    kinds: ClassVar[tuple[str, ...]] = ()
    state_keys: ClassVar[tuple[str, ...]] = ()
    registry: ClassVar[dict[str, type[OptimizerRule]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for k in cls.__dict__.get("kinds", ()):
            OptimizerRule.registry[k] = cls

    def __init__(self, hyper: dict[str, Any]) -> None:
        self.hyper = hyper

    @classmethod
    def check(cls, hyper: dict[str, Any]) -> None:
        """Raise :class:`UnsupportedOptimizerError` for settings the rule does not model."""

    def fresh_state(self, theta: Tensor) -> State:
        """The optimizer's state before its first step (for the keys it fills lazily: empty)."""
        return {}

    def step(self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int) -> tuple[Tensor, State]:
        """θ_{t+1} and the new state from θ_t, the state, the batch gradient g and η_t.

        ``k``: how many steps the optimizer had taken before this one (its bias corrections and
        first-step rules use it)."""
        raise NotImplementedError

    def adjoint(
        self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int, theta_bar: Tensor,
        state_bar: State, after: State | None = None,
    ) -> tuple[Tensor, Tensor, State]:
        """(w, θ̄ without the Hessian term, s̄) from the adjoint (θ̄', s̄') of the step's output.

        ``state_bar`` may lack keys (zero adjoint). The full θ̄_t is the returned θ̄ plus
        H_B(θ_t)·w. ``after``: the state this step produced, when a replay has it (a rule may
        reuse it instead of recomputing, e.g. Adam's m', v'; it must equal the step's output)."""
        raise NotImplementedError


def get_rule(kind: str) -> type[OptimizerRule]:
    """The rule modelling ``torch.optim.<kind>``; a named error for optimizers without one."""
    try:
        return OptimizerRule.registry[kind]
    except KeyError:
        raise UnsupportedOptimizerError(
            f"no Diff-In rule for optimizer {kind!r} (supported: "
            f"{', '.join(sorted(OptimizerRule.registry))}); record with one of those, or score with "
            "'tracin' or 'if-cg', which do not follow the optimizer"
        ) from None

