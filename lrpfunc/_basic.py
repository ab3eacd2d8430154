"""The general LRP rule (Zennit's ``BasicHook``) and parameter modifiers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ._call import Call, Propagated, RuleError
from ._functorch import values_only
from ._stabilize import stabilize

Tensor = torch.Tensor

__all__ = [
    "ParamMod",
    "BasicRule",
    "basic",
    "identity",
    "keep_param",
    "positive_part",
    "negative_part",
    "default_gradient_mapper",
    "default_reducer",
]


def identity(tensor: Tensor) -> Tensor:
    """The identity input or output modifier (recognised by :class:`BasicRule`, which then reuses the
    recorded forward pass instead of recomputing it)."""
    return tensor


def keep_param(param: Tensor, name: str) -> Tensor:
    """The identity parameter modifier."""
    return param


def default_gradient_mapper(grad_output: Tensor, outputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``grad_output / stabilize(y_k)`` for every modified output ``y_k``."""
    return tuple(grad_output / stabilize(output) for output in outputs)


def positive_part(x: Tensor) -> Tensor:
    """``x^+ = max(x, 0)`` (an input modifier)."""
    return x.clamp(min=0)


def negative_part(x: Tensor) -> Tensor:
    """``x^- = min(x, 0)`` (an input modifier)."""
    return x.clamp(max=0)


def default_reducer(inputs: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """``sum_k x_k * v_k``."""
    return sum(x * v for x, v in zip(inputs, gradients))  # type: ignore[return-value]


def _names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class ParamMod:
    """How a rule modifies a call's parameters (Zennit's ``ParamMod``).

    Args:
        modifier: ``(param, name) -> modified param``; ignored when ``param_keys`` is empty.
        param_keys: Names of the parameters to modify; ``None`` means every parameter the called module
            holds directly (``module.named_parameters(recurse=False)``).
        zero_params: Names of parameters replaced by zeros instead of being modified.
        require_params: If true, every name in ``param_keys`` must exist on the call (an attribute that is
            ``None``, like a missing bias, counts as existing and is skipped); otherwise attribution raises
            :class:`~lrpfunc.RuleError`.

    Example:
        >>> positive = ParamMod(lambda w, name: w.clamp(min=0), zero_params="bias")
    """

    modifier: Callable[[Tensor, str], Tensor] = keep_param
    param_keys: tuple[str, ...] | None = None
    zero_params: tuple[str, ...] | None = None
    require_params: bool = True

    def __init__(
        self,
        modifier: Callable[[Tensor, str], Tensor] = keep_param,
        param_keys: str | Sequence[str] | None = None,
        zero_params: str | Sequence[str] | None = None,
        require_params: bool = True,
    ) -> None:
        if not callable(modifier):
            raise TypeError(f"ParamMod: modifier must be callable, got {type(modifier).__name__}")
        object.__setattr__(self, "modifier", modifier)
        object.__setattr__(self, "param_keys", _names(param_keys))
        object.__setattr__(self, "zero_params", _names(zero_params))
        object.__setattr__(self, "require_params", bool(require_params))

    @classmethod
    def ensure(cls, value: ParamMod | Callable[[Tensor, str], Tensor]) -> ParamMod:
        """A ``ParamMod`` as it is; a function ``(param, name) -> param`` wrapped with defaults."""
        if isinstance(value, ParamMod):
            return value
        if callable(value):
            return cls(value)
        raise TypeError(f"ParamMod.ensure: expected a ParamMod or a callable, got {type(value).__name__}")

    def keys(self, call: Call) -> tuple[str, ...]:
        """The parameter names this modifier acts on for ``call``."""
        if self.param_keys is not None:
            return self.param_keys
        return tuple(name for name in call.params if "." not in name)

    def is_identity(self, call: Call) -> bool:
        """Whether applying this modifier to ``call`` leaves every parameter as it is."""
        if self.modifier is keep_param and not self.zero_params:
            return True
        if self.modifier is not keep_param:
            return not self.keys(call)
        zero = set(self.zero_params or ())
        return not any(key in zero and key in call.params for key in self.keys(call))

    def apply(self, call: Call, rule: str = "ParamMod") -> dict[str, Tensor]:
        """The call's parameters with this modification applied.

        Raises:
            RuleError: A required parameter is missing.
        """
        keys = self.keys(call)
        missing = [
            key
            for key in keys
            if key not in call.params and not (call.module is not None and hasattr(call.module, key))
        ]
        if self.require_params and missing:
            have = ", ".join(repr(name) for name in call.params) or "none"
            raise RuleError(
                f"rule {rule} requires parameter(s) {', '.join(repr(m) for m in missing)} of "
                f"{call.describe()}, which has parameters: {have}. Use a rule without parameters "
                f"(e.g. norm or passthrough) for this call, or ParamMod(..., require_params=False)."
            )
        zero, wanted = set(self.zero_params or ()), set(keys)
        modified: dict[str, Tensor] = {}
        for key in call.params:  # each read once: a parameter computed when read (merged) is not held beside its change
            param = call.params[key]
            if key in wanted:
                param = torch.zeros_like(param) if key in zero else self.modifier(param, key)
            modified[key] = param
        return modified


@dataclass(frozen=True)
class BasicRule:
    """The general LRP rule; build it with :func:`basic`. See there for the definition."""

    input_modifiers: tuple[Callable[[Tensor], Tensor], ...]
    param_modifiers: tuple[ParamMod, ...]
    output_modifiers: tuple[Callable[[Tensor], Tensor], ...]
    gradient_mapper: Callable[[Tensor, Sequence[Tensor]], Sequence[Tensor | None] | Tensor] = default_gradient_mapper
    reducer: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor] = default_reducer
    name: str = field(default="basic", compare=False)
    hold_statistics: bool = False
    pullback: bool | None = field(default=None, compare=False)
    #: The gradient mapper and the reducer accept ``None`` for a term that was left out because it is exactly
    #: zero (see :meth:`_zero_terms`); the built-in sign-splitting rules (z+, alpha-beta, gamma) do.
    zero_terms: bool = field(default=False, compare=False)
    #: ``"pullback"`` when the rule is ``R_in = x * J^T (R / z)`` with the call's true Jacobian ``J`` and no
    #: stabilizer, ``"modified"`` when ``J`` has the statistics held: it can then propagate gradients instead of
    #: relevance (:meth:`modified_gradient`); set by :func:`lrpfunc.rules.epsilon`, :func:`~lrpfunc.rules.norm` and
    #: :func:`~lrpfunc.rules.normalization` with a zero stabilizer and no zeroed parameters.
    gradient_form: str | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        return self.name

    @property
    def needs_pullback(self) -> bool:
        """Whether the rule may use the call's true pullback: some modifier triple leaves inputs and parameters as
        they are (then the recorded output and pullback are reused instead of a replay)."""
        if self.pullback is not None:
            return self.pullback
        if self.hold_statistics:
            return False
        return any(
            in_mod is identity and param_mod.modifier is keep_param
            for in_mod, param_mod in zip(self.input_modifiers, self.param_modifiers)
        )

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> Propagated:
        if len(call.outputs) != 1 or not call.inputs:
            raise RuleError(
                f"rule {self.name} handles calls with at least one activation input and exactly one "
                f"floating-point output; {call.describe()} has {len(call.inputs)} input(s) and "
                f"{len(call.outputs)} output(s). Attach a rule for this kind of call, or none."
            )
        with_params = call.wants_param_relevance
        (grad_output,) = grad_outputs
        if (
            len(self.input_modifiers) == 1
            and self.input_modifiers[0] is identity
            and self.output_modifiers[0] is identity
            and not with_params
            and not self.hold_statistics
            and self.param_modifiers[0].is_identity(call)
        ):
            return self._identity_triple(call, grad_output)
        inputs: list[tuple[Tensor, ...]] = []
        params: list[Mapping[str, Tensor]] = []
        outputs: list[Tensor] = []
        pullbacks: list[Callable[[Tensor], tuple[tuple[Tensor, ...], dict[str, Tensor]]]] = []
        skipped = self._zero_terms(call, with_params)
        for k, (in_mod, param_mod, out_mod) in enumerate(
            zip(self.input_modifiers, self.param_modifiers, self.output_modifiers)
        ):
            if k in skipped:  # f(0; theta_k) = 0 and x_k = 0: the term adds exactly nothing
                inputs.append(call.inputs)
                params.append({})
                outputs.append(None)  # type: ignore[arg-type]
                pullbacks.append(_no_term)
                continue
            x_k, p_k, raw, pull_raw = self._modified_call(call, in_mod, param_mod, with_params)
            if out_mod is identity:
                y_k, pull = raw, pull_raw
            else:
                y_k, pull_out = torch.func.vjp(out_mod, raw)  # type: ignore[misc]  # annotated with and without has_aux
                pull = _compose(pull_raw, pull_out)
            inputs.append(x_k)
            params.append(p_k)
            outputs.append(y_k)
            pullbacks.append(pull)
        gammas = self.gradient_mapper(grad_output, outputs)
        if isinstance(gammas, Tensor):
            gammas = (gammas,)
        gammas = tuple(gammas)
        if len(gammas) != len(outputs):
            raise RuleError(
                f"rule {self.name}: the gradient mapper returned {len(gammas)} tensors for {len(outputs)} "
                f"modified outputs of {call.describe()}"
            )
        # a gradient the mapper leaves out (None) is not pulled back: the reducer must not read it
        grads = [
            pull(gamma) if gamma is not None and pull is not _no_term else ((None,) * len(call.inputs), {})
            for pull, gamma in zip(pullbacks, gammas)
        ]
        # a None gradient only for a term left out under zero_terms, whose reducer accepts it
        relevance = tuple(
            self.reducer([x_k[i] for x_k in inputs], cast("list[Tensor]", [g_k[0][i] for g_k in grads]))
            for i in range(len(call.inputs))
        )
        param_relevance: dict[str, Tensor] = {}
        if with_params:
            used = [g_k for g_k, gamma in zip(grads, gammas) if gamma is not None]
            shared = set.intersection(*(set(g_k[1]) for g_k in used)) if used else set()
            for name in call.params:
                if name in shared:
                    param_relevance[name] = self.reducer(
                        [p_k[name] for p_k in params], [g_k[1].get(name) for g_k in grads]  # type: ignore[misc]
                    )
        return Propagated(relevance, param_relevance)

    def modified_gradient(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The rule in gradient form: ``g_in = J^T g_out`` (valid when :attr:`gradient_form` is set).

        With ``R_out = z * g_out`` the rule gives ``R_in = x * J^T (R_out / z) = x * g_in``: the division by the output
        and the product with the input cancel against the neighbouring rules' (see :mod:`lrpfunc._sweep`).
        """
        if self.gradient_form is None:
            raise RuleError(f"rule {self.name} has no gradient form: it needs the relevance itself")
        if len(call.outputs) != 1 or not call.inputs:
            raise RuleError(
                f"rule {self.name} handles calls with at least one activation input and exactly one "
                f"floating-point output; {call.describe()} has {len(call.inputs)} input(s) and "
                f"{len(call.outputs)} output(s). Attach a rule for this kind of call, or none."
            )
        if self.hold_statistics:
            _, _, _, pull = self._modified_call(call, identity, self.param_modifiers[0], False)
            return tuple(pull(grad_outputs[0])[0])
        return call.pullback(grad_outputs)

    def _zero_terms(self, call: Call, with_params: bool) -> frozenset[int]:
        """The terms that are exactly zero and can be left out: for a rule that accepts it (:attr:`zero_terms`), on one
        linear operation (so that ``f(0; theta) = 0`` once the bias is zeroed), for the negative part of an input known
        to have none (``x^-`` after a ReLU). Known from the record (:attr:`Call.nonnegative_inputs`), never from the
        values, so that the attribution can be traced.

        The term's value is zero; its derivatives are zero too where the input is flat at zero
        (:attr:`Call.flat_at_zero_inputs`: after a ReLU, but not after ``clamp(min=0)``, whose derivative at 0 is 1).
        For any other non-negative input the term is left out only when nothing differentiates the result."""
        if not self.zero_terms or not call.linear or with_params or len(call.inputs) != 1:
            return frozenset()
        if not call.nonnegative_inputs or not call.nonnegative_inputs[0]:
            return frozenset()
        if not (call.flat_at_zero_inputs and call.flat_at_zero_inputs[0]) and not values_only():
            return frozenset()
        has_bias = "bias" in call.params
        return frozenset(
            k
            for k, (in_mod, param_mod, out_mod) in enumerate(
                zip(self.input_modifiers, self.param_modifiers, self.output_modifiers)
            )
            if in_mod is negative_part
            and out_mod is identity
            and (not has_bias or "bias" in (param_mod.zero_params or ()))
        )

    def _identity_triple(self, call: Call, grad_output: Tensor) -> Propagated:
        """One triple that keeps inputs, parameters and outputs (epsilon, norm): the recorded output and pullback."""
        gammas = self.gradient_mapper(grad_output, call.outputs)
        if not isinstance(gammas, Tensor):
            gammas = tuple(gammas)
            if len(gammas) != 1:
                raise RuleError(
                    f"rule {self.name}: the gradient mapper returned {len(gammas)} tensors for 1 modified output of "
                    f"{call.describe()}"
                )
            (gammas,) = cast("tuple[Tensor]", gammas)  # None only for terms left out, never the identity triple's
        gradients = call.pullback((gammas,))
        return Propagated(tuple(self.reducer((x,), (g,)) for x, g in zip(call.inputs, gradients)), {})

    def _modified_call(
        self, call: Call, in_mod: Callable[[Tensor], Tensor], param_mod: ParamMod, with_params: bool
    ) -> tuple[tuple[Tensor, ...], Mapping[str, Tensor], Tensor, Callable[[Tensor], Any]]:
        """Modified inputs and parameters, the modified output and its pullback to both."""
        hold = self.hold_statistics
        if in_mod is identity and param_mod.is_identity(call) and not with_params and not hold:
            pullback = call.pullback
            return call.inputs, call.params, call.outputs[0], lambda g: (pullback((g,)), {})
        if in_mod is positive_part and call.nonnegative_inputs:  # x^+ = x, with its derivative 1, for x >= 0
            x_k = tuple(x if known else in_mod(x) for x, known in zip(call.inputs, call.nonnegative_inputs))
        else:
            x_k = tuple(in_mod(x) for x in call.inputs)
        p_k = param_mod.apply(call, self.name)
        if call.linear and not hold:
            # one linear operation: its modified forward and that forward's pullback in closed form
            if with_params:
                return (x_k, p_k, *_with_param_pullback(lambda xs, ps: call.forward(xs, ps), x_k, p_k))
            (raw,) = call.forward(x_k, p_k)
            return x_k, p_k, raw, lambda g: ((call.transpose(g, p_k),), {})
        if with_params:
            return (x_k, p_k, *_with_param_pullback(
                lambda xs, ps: call.forward(xs, ps, hold_statistics=hold), x_k, p_k
            ))
        (raw,), pull_x = torch.func.vjp(  # type: ignore[misc]  # annotated with and without has_aux
            lambda *xs: call.forward(xs, p_k, hold_statistics=hold), *x_k
        )
        return x_k, p_k, raw, lambda g: (pull_x((g,)), {})


def _with_param_pullback(
    forward: Callable[[tuple[Tensor, ...], Mapping[str, Tensor]], tuple[Tensor, ...]],
    inputs: tuple[Tensor, ...],
    params: Mapping[str, Tensor],
) -> tuple[Tensor, Callable[[Tensor], tuple[tuple[Tensor, ...], dict[str, Tensor]]]]:
    """The modified output and its pullback to the inputs and to the floating-point parameters (an integer operand,
    such as a step counter added to a layer's output, has no relevance)."""
    floats = {name: value for name, value in params.items() if value.is_floating_point() or value.is_complex()}
    others = {name: value for name, value in params.items() if name not in floats}
    (raw,), pull = torch.func.vjp(  # type: ignore[misc]  # annotated with and without has_aux
        lambda xs, ps: forward(xs, {**others, **ps}), inputs, floats
    )
    return raw, lambda g: pull((g,))


def _no_term(gamma: Tensor) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    raise AssertionError("a term left out is never pulled back")


def _compose(pull_raw: Callable[[Tensor], Any], pull_out: Callable[[Tensor], tuple[Tensor]]) -> Callable[[Tensor], Any]:
    return lambda g: pull_raw(pull_out(g)[0])


def basic(
    *,
    input_modifiers: Sequence[Callable[[Tensor], Tensor]] | None = None,
    param_modifiers: Sequence[ParamMod | Callable[[Tensor, str], Tensor]] | None = None,
    output_modifiers: Sequence[Callable[[Tensor], Tensor]] | None = None,
    gradient_mapper: Callable[[Tensor, Sequence[Tensor]], Sequence[Tensor | None] | Tensor] | None = None,
    reducer: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor] | None = None,
    name: str = "basic",
    hold_statistics: bool = False,
    needs_pullback: bool | None = None,
    zero_terms: bool = False,
    gradient_form: str | None = None,
) -> BasicRule:
    """The general LRP rule, Zennit's ``BasicHook`` as a pure value.

    Definition:
        For a call ``y = f(x; theta)`` with incoming relevance ``R_out`` and ``K`` modifier triples::

            x_k = h_in_k(x)
            y_k = h_out_k(f(x_k; h_param_k(theta)))
            (gamma_1, ..., gamma_K) = gradient_mapper(R_out, (y_1, ..., y_K))
            v_k = (d y_k / d x_k)^T gamma_k
            R_in = reducer((x_1, ..., x_K), (v_1, ..., v_K))

        Defaults: identity modifiers (as many as the longest list given), ``gradient_mapper`` =
        ``R_out / stabilize(y_k)`` for each ``k`` and ``reducer`` = ``sum_k x_k * v_k``, i.e. the epsilon rule
        with ``epsilon = 1e-6``. A call with several activation inputs applies the modifiers to each input
        and the reducer once per input. When the caller asks for parameter relevance, the same reducer is
        applied to ``(h_param_k(theta), (d y_k / d theta_k)^T gamma_k)`` for each parameter.

        Every step is ordinary differentiable torch code, so derivatives of ``R_in`` w.r.t. ``x``, the
        parameters and ``R_out`` are exact; a modifier triple that is the identity reuses the recorded
        output and pullback instead of recomputing the forward pass.

    Args:
        input_modifiers: ``K`` functions ``x -> x_k``.
        param_modifiers: ``K`` :class:`ParamMod` or functions ``(param, name) -> param``.
        output_modifiers: ``K`` functions ``y -> y_k``.
        gradient_mapper: ``(R_out, outputs) -> K tensors`` (a single tensor is accepted for ``K = 1``).
        reducer: ``(inputs, gradients) -> R_in``.
        name: Shown in rule tables and error messages.
        hold_statistics: Evaluate the modified forward passes with the statistics of normalisations held at
            their recorded values (see :meth:`lrpfunc.Call.forward`); used by :func:`lrpfunc.rules.normalization`.
        needs_pullback: Whether the rule uses the call's recorded pullback; by default, when some modifier triple
            keeps inputs and parameters as they are. ``False`` lets the tracer run the call without recording it
            (a gradient mapper may then return ``None`` for such a triple, whose output it only reads).
        zero_terms: The gradient mapper and the reducer accept ``None`` for the output and the gradient of a triple
            whose input modifier is :func:`positive_part` or :func:`negative_part` of an input that has no such
            part, on a linear call with that triple's bias zeroed: such a term is exactly zero, and is left out. Where
            something differentiates the result, only for an input flat at zero (after a ReLU, whose derivative at 0
            is 0; :attr:`lrpfunc.Call.flat_at_zero_inputs`), where every derivative of the term is zero as well.
        gradient_form: ``"pullback"`` declares that the rule is ``R_in = x * J^T (R / z)`` with the call's true
            Jacobian and a division without stabilizer (:func:`lrpfunc._stabilize.ratio`: zero outputs pass nothing),
            ``"modified"`` the same with the statistics held (``hold_statistics``): the sweep may then propagate
            ``R / x`` instead of ``R`` through it (:meth:`BasicRule.modified_gradient`), which is exact and cheaper.
            Only for a single identity modifier triple.

    Returns:
        A :class:`BasicRule`.

    Raises:
        ValueError: The modifier lists have different lengths.

    References:
        Bach et al. (2015), On pixel-wise explanations for non-linear classifier decisions by layer-wise
        relevance propagation, PLoS ONE. Anders et al. (2021), Software for dataset-wide XAI: from local
        explanations to global insights with Zennit, CoRelAy, and ViRelAy, arXiv:2106.13200.

    Example:
        >>> lrp_zplus = basic(param_modifiers=[ParamMod(lambda w, _: w.clamp(min=0), zero_params="bias")])
    """
    given = {
        "input_modifiers": input_modifiers,
        "param_modifiers": param_modifiers,
        "output_modifiers": output_modifiers,
    }
    lengths = {key: len(value) for key, value in given.items() if value is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"basic: the modifier lists must have the same length, got {lengths}")
    count = next(iter(lengths.values()), 1)
    if count == 0:
        raise ValueError("basic: the modifier lists must not be empty")
    return BasicRule(
        input_modifiers=tuple(input_modifiers) if input_modifiers is not None else (identity,) * count,
        param_modifiers=tuple(ParamMod.ensure(p) for p in param_modifiers)
        if param_modifiers is not None
        else (ParamMod(),) * count,
        output_modifiers=tuple(output_modifiers) if output_modifiers is not None else (identity,) * count,
        gradient_mapper=gradient_mapper if gradient_mapper is not None else default_gradient_mapper,
        reducer=reducer if reducer is not None else default_reducer,
        name=name,
        hold_statistics=hold_statistics,
        pullback=needs_pullback,
        zero_terms=zero_terms,
        gradient_form=gradient_form,
    )
