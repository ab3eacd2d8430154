"""Rules: pure values that rewrite the vector-Jacobian product of one call.

Every LRP rule here is an instance of :func:`basic` with Zennit 0.5.1's modifiers and defaults; the
ReLU rules (DeconvNet, Guided Backprop, beta-smooth) and :func:`passthrough` are small functions of the
call's cotangents. A rule is called as ``rule(call, grad_outputs)`` (see :class:`lrpfunc.Call`).

Notation: ``x`` input, ``w``/``b`` weight and bias, ``z = f(x)`` the output, ``R`` the incoming relevance,
``s(.)`` the stabilizer (``z + (sign(z) + (z == 0)) * eps``), ``(.)^+``/``(.)^-`` positive/negative parts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._basic import BasicRule, ParamMod, basic, identity, keep_param, negative_part, positive_part
from ._call import Call, RuleError
from ._product_rules import gated, quotient, softmax, uniform
from ._recompute import recompute
from ._stabilize import StabilizerLike, divider, ensure_stabilizer, is_zero

Tensor = torch.Tensor

__all__ = [
    "basic",
    "ParamMod",
    "BasicRule",
    "clamp_mod",
    "gamma_mod",
    "no_mod",
    "epsilon",
    "zplus",
    "alpha_beta",
    "gamma",
    "zbox",
    "flat",
    "wsquare",
    "norm",
    "passthrough",
    "relu_deconvnet",
    "relu_guided_backprop",
    "relu_beta_smooth",
    "uniform",
    "gated",
    "quotient",
    "softmax",
    "normalization",
    "attention",
    "identity",
    "recompute",
]

ZeroParams = str | Sequence[str] | None


def _zero_bias(zero_params: ZeroParams) -> tuple[str, ...]:
    names = () if zero_params is None else (zero_params,) if isinstance(zero_params, str) else tuple(zero_params)
    return names if "bias" in names else (*names, "bias")


def _clamp(min: float | None = None, max: float | None = None):  # noqa: A002
    def clamp(param: Tensor, name: str) -> Tensor:
        return param.clamp(min=min, max=max)

    return clamp


def clamp_mod(min: float | None = None, max: float | None = None, **kwargs: object) -> ParamMod:  # noqa: A002
    """:class:`ParamMod` clamping parameters to ``[min, max]`` (Zennit's ``ClampMod``)."""
    return ParamMod(_clamp(min, max), **kwargs)  # type: ignore[arg-type]


def gamma_mod(gamma: float = 0.25, min: float | None = None, max: float | None = None, **kwargs: object) -> ParamMod:  # noqa: A002
    """:class:`ParamMod` ``w + gamma * clamp(w, min, max)`` (Zennit's ``GammaMod``)."""

    def modifier(param: Tensor, name: str) -> Tensor:
        return param + gamma * param.clamp(min=min, max=max)

    return ParamMod(modifier, **kwargs)  # type: ignore[arg-type]


def no_mod(**kwargs: object) -> ParamMod:
    """:class:`ParamMod` that keeps parameters, honouring ``zero_params``/``param_keys`` (Zennit's ``NoMod``)."""
    return ParamMod(keep_param, **kwargs)  # type: ignore[arg-type]


_positive, _negative = positive_part, negative_part


def _sum_present(values: Sequence[Tensor | None]) -> Tensor:
    """The sum of the terms that are there (a term left out as exactly zero is ``None``)."""
    present = [value for value in values if value is not None]
    total = present[0]
    for value in present[1:]:
        total = total + value
    return total


def _sign_split_reducer(inputs: Sequence[Tensor], gradients: Sequence[Tensor | None]) -> Tensor:
    """``sum_k x_k * v_k`` over the terms that are there."""
    return _sum_present([x * v if v is not None else None for x, v in zip(inputs, gradients)])


def _first_product(inputs: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    return inputs[0] * gradients[0]


def _gradient_only(inputs: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    return gradients[0]


def epsilon(epsilon: StabilizerLike = 1e-6, zero_params: ZeroParams = None) -> BasicRule:
    """LRP-epsilon.

    Definition:
        ``R_i = sum_j x_i w_ji R_j / s(z_j)`` with ``s`` the stabilizer of ``epsilon`` (a float, or a callable
        ``z -> stabilized z``). ``epsilon=0`` gives LRP-0.

    References:
        Bach et al. (2015), PLoS ONE 10(7): e0130140. Montavon et al. (2019), Layer-wise relevance
        propagation: an overview, in Explainable AI, LNCS 11700.
    """
    divide = divider(epsilon)
    return basic(
        input_modifiers=[identity],
        param_modifiers=[no_mod(zero_params=zero_params)],
        output_modifiers=[identity],
        gradient_mapper=lambda grad, outputs: (divide(grad, outputs[0]),),
        reducer=_first_product,
        name=f"epsilon(epsilon={epsilon!r}{_zp(zero_params)})",
        gradient_form=_gradient_form(epsilon, zero_params),
    )


def _gradient_form(stabilizer: StabilizerLike, zero_params: ZeroParams, held: bool = False) -> str | None:
    """The gradient form of a rule ``x * J^T (R / z)`` without stabilizer and zeroed parameters (see :func:`basic`):
    ``"pullback"`` with the call's true Jacobian, ``"modified"`` with the statistics held."""
    if not is_zero(stabilizer) or zero_params:
        return None
    return "modified" if held else "pullback"


def _zp(zero_params: ZeroParams) -> str:
    return "" if not zero_params else f", zero_params={zero_params!r}"


def zplus(stabilizer: StabilizerLike = 1e-6, zero_params: ZeroParams = None) -> BasicRule:
    """LRP-z+ (alpha=1, beta=0, also for negative inputs).

    Definition:
        ``R_i = sum_j (x_i^+ w_ji^+ + x_i^- w_ji^-) R_j / s(sum_i' x_i'^+ w_ji'^+ + x_i'^- w_ji'^- + b_j^+)``.

    References:
        Bach et al. (2015); Montavon et al. (2017), Explaining nonlinear classification decisions with deep
        Taylor decomposition, Pattern Recognition 65.
    """
    stab = ensure_stabilizer(stabilizer)
    return basic(
        input_modifiers=[_positive, _negative],
        param_modifiers=[
            clamp_mod(min=0.0, zero_params=zero_params), clamp_mod(max=0.0, zero_params=_zero_bias(zero_params))
        ],
        output_modifiers=[identity, identity],
        gradient_mapper=lambda grad, outputs: (grad / stab(_sum_present(outputs)),) * 2,
        reducer=_sign_split_reducer,
        name=f"zplus(stabilizer={stabilizer!r}{_zp(zero_params)})",
        zero_terms=True,
    )


def alpha_beta(
    alpha: float = 2.0, beta: float = 1.0, stabilizer: StabilizerLike = 1e-6, zero_params: ZeroParams = None
) -> BasicRule:
    """LRP-alpha-beta.

    Definition:
        ``R_i = alpha * R_i^+ - beta * R_i^-`` where ``R^+`` is z+ over the positive contributions
        (``x^+ w^+`` and ``x^- w^-``, bias ``b^+``) and ``R^-`` the same over the negative ones (``x^+ w^-``
        and ``x^- w^+``, bias ``b^-``), each normalised by its own stabilized sum.

    Raises:
        ValueError: ``alpha`` or ``beta`` negative, or ``alpha - beta`` not 1 (compared with a tolerance, so
            ``alpha=1.4, beta=0.4`` is accepted, unlike Zennit's exact ``!=``).

    References:
        Bach et al. (2015), PLoS ONE 10(7): e0130140.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha_beta: alpha and beta must be non-negative, got alpha={alpha}, beta={beta}")
    if not math.isclose(alpha - beta, 1.0, rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(
            f"alpha_beta: alpha - beta must equal 1, got alpha={alpha}, beta={beta} (difference {alpha - beta})"
        )
    stab = ensure_stabilizer(stabilizer)
    nobias = _zero_bias(zero_params)

    def mapper(grad: Tensor, outputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
        positive = grad / stab(_sum_present(outputs[:2]))
        negative = grad / stab(_sum_present(outputs[2:]))
        return positive, positive, negative, negative

    def reducer(inputs: Sequence[Tensor], gradients: Sequence[Tensor | None]) -> Tensor:
        positive = _sign_split_reducer(inputs[:2], gradients[:2])
        negative = _sign_split_reducer(inputs[2:], gradients[2:])
        return alpha * positive - beta * negative

    return basic(
        input_modifiers=[_positive, _negative, _positive, _negative],
        param_modifiers=[
            clamp_mod(min=0.0, zero_params=zero_params),
            clamp_mod(max=0.0, zero_params=nobias),
            clamp_mod(max=0.0, zero_params=zero_params),
            clamp_mod(min=0.0, zero_params=nobias),
        ],
        output_modifiers=[identity] * 4,
        gradient_mapper=mapper,
        reducer=reducer,
        name=f"alpha_beta(alpha={alpha!r}, beta={beta!r}{_zp(zero_params)})",
        zero_terms=True,
    )


def gamma(gamma: float = 0.25, stabilizer: StabilizerLike = 1e-6, zero_params: ZeroParams = None) -> BasicRule:
    """Generalized LRP-gamma (sign-aware, as Zennit's ``Gamma``).

    Definition:
        Where ``z_j > 0``: ``R_i = sum_j (x_i^+ (w_ji + gamma w_ji^+) + x_i^- (w_ji + gamma w_ji^-)) R_j / s(.)``
        with the denominator the sum of those terms over ``i`` (plus ``b + gamma b^+``); where ``z_j < 0``
        the same with the roles of ``w^+`` and ``w^-`` swapped. Equals the original gamma rule on positive
        inputs.

    References:
        Montavon et al. (2019), Layer-wise relevance propagation: an overview. Andéol et al. (2021),
        Learning domain invariant representations by joint Wasserstein distance minimization, arXiv:2106.04923.
    """
    stab = ensure_stabilizer(stabilizer)
    nobias = _zero_bias(zero_params)

    def mapper(grad: Tensor, outputs: Sequence[Tensor | None]) -> list[Tensor | None]:
        positive = (outputs[4] > 0.0) * grad / stab(_sum_present(outputs[:2]))  # type: ignore[operator]
        negative = (outputs[4] < 0.0) * grad / stab(_sum_present(outputs[2:4]))  # type: ignore[operator]
        return [positive, positive, negative, negative, None]  # the fifth output is only read for its sign

    def reducer(inputs: Sequence[Tensor], gradients: Sequence[Tensor | None]) -> Tensor:
        return _sign_split_reducer(inputs[:4], gradients[:4])

    return basic(
        input_modifiers=[_positive, _negative, _positive, _negative, identity],
        param_modifiers=[
            gamma_mod(gamma, min=0.0, zero_params=zero_params),
            gamma_mod(gamma, max=0.0, zero_params=nobias),
            gamma_mod(gamma, max=0.0, zero_params=zero_params),
            gamma_mod(gamma, min=0.0, zero_params=nobias),
            no_mod(),
        ],
        output_modifiers=[identity] * 5,
        gradient_mapper=mapper,
        reducer=reducer,
        name=f"gamma(gamma={gamma!r}{_zp(zero_params)})",
        needs_pullback=False,
        zero_terms=True,
    )


def _expand_bound(bound: float | Tensor, like: Tensor) -> Tensor:
    """``bound`` expanded to the input ``like`` (N, C, ...), aligned from the left.

    Accepted: a float (or 0-d tensor); a vector of length C (one bound per channel); a tensor with as many
    dimensions as the input whose sizes each equal the input's or are 1 (the batch size may also be larger, and is
    then cut to the input's, as Zennit does). Anything else is ambiguous (a ``(1, C)`` bound on an ``(N, C, L)`` input
    could mean per channel or per position) and raises.
    """
    tensor = torch.as_tensor(bound).to(like)
    if tensor.ndim == 1 and like.ndim >= 2:
        if tensor.shape[0] == like.shape[1]:
            return tensor.reshape(1, -1, *([1] * (like.ndim - 2))).expand(like.shape)
    elif tensor.ndim == like.ndim and tensor.ndim > 0:
        if tensor.shape[0] > like.shape[0]:
            tensor = tensor[: like.shape[0]]
        if all(size in (1, target) for size, target in zip(tensor.shape, like.shape)):
            return tensor.expand(like.shape)
    elif tensor.ndim == 0:
        return tensor.expand(like.shape)
    channels = like.shape[1] if like.ndim >= 2 else None
    raise RuleError(
        f"zbox: a bound of shape {tuple(tensor.shape)} does not broadcast to the input's shape {tuple(like.shape)} "
        f"unambiguously; give a float, a vector of {channels} per-channel bounds, or a tensor of the input's number of "
        f"dimensions whose sizes equal the input's or are 1 (per channel: shape (1, C, 1, 1) for images)"
    )


def zbox(
    low: float | Tensor, high: float | Tensor, stabilizer: StabilizerLike = 1e-6, zero_params: ZeroParams = None
) -> BasicRule:
    """LRP-z^B (ZBox) for inputs bounded by ``[low, high]``.

    Definition:
        ``R_i = sum_j (x_i w_ji - l_i w_ji^+ - h_i w_ji^-) R_j / s(sum_i' x_i' w_ji' - l_i' w_ji'^+ - h_i' w_ji'^-)``
        (bias kept in each term as Zennit does). ``low``/``high`` are floats, vectors of one bound per channel,
        or tensors with the input's number of dimensions whose sizes equal the input's or are 1 (the batch may be
        1); bounds align from the left, and a bound that could align two ways is refused.

    References:
        Montavon et al. (2017), Pattern Recognition 65.
    """
    stab = ensure_stabilizer(stabilizer)

    def lows(x: Tensor) -> Tensor:
        return _expand_bound(low, x)

    def highs(x: Tensor) -> Tensor:
        return _expand_bound(high, x)

    def mapper(grad: Tensor, outputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return (grad / stab(outputs[0] - outputs[1] - outputs[2]),) * 3

    def reducer(inputs: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
        return inputs[0] * gradients[0] - inputs[1] * gradients[1] - inputs[2] * gradients[2]

    return basic(
        input_modifiers=[identity, lows, highs],
        param_modifiers=[
            no_mod(zero_params=zero_params),
            clamp_mod(min=0.0, zero_params=zero_params),
            clamp_mod(max=0.0, zero_params=zero_params),
        ],
        output_modifiers=[identity] * 3,
        gradient_mapper=mapper,
        reducer=reducer,
        name=f"zbox(low={_short(low)}, high={_short(high)}{_zp(zero_params)})",
    )


def _short(value: float | Tensor) -> str:
    return f"tensor{tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)


def _ones(param: Tensor, name: str) -> Tensor:
    return torch.ones_like(param)


def _square(param: Tensor, name: str) -> Tensor:
    return param**2


def flat(stabilizer: StabilizerLike = 1e-6, zero_params: ZeroParams = None) -> BasicRule:
    """LRP-flat: relevance spread uniformly over each output's receptive field.

    Definition:
        ``R_i = sum_j 1 * R_j / s(sum_i' 1)`` (weights set to one, bias to zero, inputs to one).

    References:
        Lapuschkin et al. (2019), Unmasking Clever Hans predictors and assessing what machines really learn,
        Nature Communications 10:1096.
    """
    stab = ensure_stabilizer(stabilizer)
    return basic(
        input_modifiers=[torch.ones_like],
        param_modifiers=[ParamMod(_ones, zero_params=_zero_bias(zero_params), require_params=False)],
        output_modifiers=[identity],
        gradient_mapper=lambda grad, outputs: (grad / stab(outputs[0]),),
        reducer=_gradient_only,
        name=f"flat({_zp(zero_params).lstrip(', ')})",
    )


def wsquare(stabilizer: StabilizerLike = 1e-6, zero_params: ZeroParams = None) -> BasicRule:
    """LRP-w^2.

    Definition:
        ``R_i = sum_j w_ji^2 R_j / s(sum_i' w_ji'^2 + b_j^2)`` (inputs set to one, parameters squared).

    References:
        Montavon et al. (2017), Pattern Recognition 65.
    """
    stab = ensure_stabilizer(stabilizer)
    return basic(
        input_modifiers=[torch.ones_like],
        param_modifiers=[ParamMod(_square, zero_params=zero_params)],
        output_modifiers=[identity],
        gradient_mapper=lambda grad, outputs: (grad / stab(outputs[0]),),
        reducer=_gradient_only,
        name=f"wsquare({_zp(zero_params).lstrip(', ')})",
    )


def norm(stabilizer: StabilizerLike = 1e-6) -> BasicRule:
    """Normalise by the output and weight by each input's contribution (sums, average pools).

    Definition:
        ``R_i = x_i * (df/dx)^T (R / s(z))``; for a sum ``z = a + b`` this is ``R_a = a R / s(z)``,
        ``R_b = b R / s(z)``. Uses no parameters.
    """
    divide = divider(stabilizer)
    return basic(
        input_modifiers=[identity],
        param_modifiers=[ParamMod(keep_param, param_keys=())],
        output_modifiers=[identity],
        gradient_mapper=lambda grad, outputs: (divide(grad, outputs[0]),),
        reducer=_first_product,
        name="norm",
        gradient_form=_gradient_form(stabilizer, None),
    )


def _single(rule: str, call: Call, grad_outputs: tuple[Tensor, ...]) -> None:
    if len(call.inputs) != 1 or len(grad_outputs) != 1 or call.inputs[0].shape != grad_outputs[0].shape:
        raise RuleError(
            f"rule {rule} handles element-wise calls with one input and one output of the same shape; "
            f"{call.describe()} has {len(call.inputs)} input(s) of shape(s) "
            f"{[tuple(x.shape) for x in call.inputs]} and {len(grad_outputs)} output(s) of shape(s) "
            f"{[tuple(g.shape) for g in grad_outputs]}"
        )


@dataclass(frozen=True)
class _Passthrough:
    replays = False
    needs_pullback = False
    passes_through = True

    def __repr__(self) -> str:
        return "passthrough"

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        _single("passthrough", call, grad_outputs)
        return grad_outputs


def passthrough() -> _Passthrough:
    """Pass the relevance through unchanged (Zennit's ``Pass``; used on activations by LRP composites).

    Definition:
        ``R_in = R_out`` for element-wise calls.
    """
    return _Passthrough()


@dataclass(frozen=True)
class _ReLUDeconvNet:
    replays = False
    needs_pullback = False

    def __repr__(self) -> str:
        return "relu_deconvnet"

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        _single("relu_deconvnet", call, grad_outputs)
        return (grad_outputs[0].clamp(min=0),)


def relu_deconvnet() -> _ReLUDeconvNet:
    """DeconvNet ReLU rule.

    Definition:
        ``R_in = max(R_out, 0)``.

    References:
        Zeiler & Fergus (2014), Visualizing and understanding convolutional networks, ECCV.
    """
    return _ReLUDeconvNet()


@dataclass(frozen=True)
class _ReLUGuidedBackprop:
    replays = False
    needs_pullback = True

    def __repr__(self) -> str:
        return "relu_guided_backprop"

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        _single("relu_guided_backprop", call, grad_outputs)
        (gradient,) = call.pullback(grad_outputs)
        return (gradient * (grad_outputs[0] > 0.0),)


def relu_guided_backprop() -> _ReLUGuidedBackprop:
    """Guided Backpropagation ReLU rule.

    Definition:
        ``R_in = relu'(x) * R_out * (R_out > 0)``.

    References:
        Springenberg et al. (2015), Striving for simplicity: the all convolutional net, ICLR workshop.
    """
    return _ReLUGuidedBackprop()


@dataclass(frozen=True)
class _ReLUBetaSmooth:
    replays = False
    beta_smooth: float
    needs_pullback = False

    def __repr__(self) -> str:
        return f"relu_beta_smooth(beta_smooth={self.beta_smooth!r})"

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        _single("relu_beta_smooth", call, grad_outputs)
        return (torch.sigmoid(self.beta_smooth * call.inputs[0]) * grad_outputs[0],)


def relu_beta_smooth(beta_smooth: float = 10.0) -> _ReLUBetaSmooth:
    """ReLU gradient replaced by the softplus gradient.

    Definition:
        ``R_in = sigmoid(beta_smooth * x) * R_out``, the derivative of ``softplus(x; beta_smooth)``, at the
        input of *this call* (a ReLU module called twice gets each call's own input, unlike Zennit).

    References:
        Dombrowski et al. (2019), Explanations can be manipulated and geometry is to blame, NeurIPS.
    """
    return _ReLUBetaSmooth(float(beta_smooth))


def normalization(epsilon: StabilizerLike = 1e-6, zero_params: ZeroParams = None) -> BasicRule:
    """Normalisation (LayerNorm, RMSNorm, GroupNorm, batch statistics) with its divisor held constant.

    Definition:
        The call is replayed with its statistics held at their recorded values (the standard deviation of a
        LayerNorm, the root mean square of an RMSNorm; written by hand, any value that depends nonlinearly on the
        input and has fewer elements than it; see :meth:`lrpfunc.Call.forward`), which leaves an affine map ``y =
        A x + b``; epsilon-LRP on it: ``R_in = x * A^T (R / s(y))``. For RMSNorm (``A`` diagonal) this is the
        identity up to the stabilizer; LayerNorm's centring ``x - mean(x)`` takes epsilon, and its bias absorbs
        relevance unless ``zero_params="bias"``.

    References:
        Ali et al. (2022), ICML (the LN rule). Achtibat et al. (2024), ICML.
    """
    divide = divider(epsilon)
    return basic(
        input_modifiers=[identity],
        param_modifiers=[no_mod(zero_params=zero_params, require_params=False)],
        output_modifiers=[identity],
        gradient_mapper=lambda grad, outputs: (divide(grad, outputs[0]),),
        reducer=_first_product,
        name=f"normalization({_zp(zero_params).lstrip(', ')})",
        hold_statistics=True,
        gradient_form=_gradient_form(epsilon, zero_params, held=True),
    )


@dataclass(frozen=True)
class _Attention:
    needs_pullback = False

    def __repr__(self) -> str:
        return "attention"

    def decompose(self, func: object, args: Sequence[object], kwargs: dict[str, object]) -> object:
        from ._attention import decompose

        return decompose(func, args, kwargs)

    def __call__(self, call: Call, grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise RuleError(f"rule attention decomposes {call.describe()} while tracing; it is never applied to a call")


def attention() -> _Attention:
    """Fused attention computed as its operations, so that their own rules apply.

    Definition:
        ``F.scaled_dot_product_attention(q, k, v, ...)`` is traced as ``softmax(q @ k^T * scale + mask) @ v`` (the
        order of HuggingFace's eager attention), and ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``)
        as its in-projection, that attention and its out-projection: the products, scaling, softmax and linear maps
        inside get the composite's rules, and second-order derivatives need no double backward of a fused kernel.
    """
    return _Attention()
