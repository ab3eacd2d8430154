"""Operation classes: what kind of computation a recorded torch operation is, for LRP.

Every operation that reads an activation is classified when it is recorded, from the function called and from
which of its operands are activations (values that depend on the input) and which are parameters or constants.
The class is a type, so composites map it to a rule like a module type::

    composites.layer_map([(ops.Product, rules.uniform()), (ops.Softmax, rules.softmax())])

The classes and the LRP treatment the named composites give them (Achtibat et al. 2024; DESIGN of this package):

==================  ===========================================================  ==============================
class               operations                                                   rule in the LRP composites
==================  ===========================================================  ==============================
:class:`Dense`      ``F.linear``, ``addmm``, ``matmul``/``mm``/``bmm``/``einsum``  ``epsilon``
                    with one activation operand (HF ``Conv1D`` included),
                    ``grouped_mm`` (experts run at once)
:class:`Convolution` ``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``                 the composite's conv rule
:class:`AvgPool`    average pooling, adaptive included                           ``norm``
:class:`Resample`   ``interpolate`` (linear modes)                               ``norm``
:class:`Reduction`  ``sum``, ``mean``                                            ``norm``
:class:`Scale`      multiplication or division by a non-activation, negation     ``norm``
:class:`Shift`      addition or subtraction of a non-activation (a bias)         ``norm``
:class:`BatchNorm`  ``batch_norm`` with running statistics (eval mode)           ``passthrough`` (as Zennit)
:class:`Sum`        sum of activations (``a + b``, ``out += identity``,          ``norm`` (the sum rule)
                    ``index_add``/``scatter_add``/``index_put(accumulate)``)
:class:`Product`    product of activations (``a * b``, ``a @ b``, gates)         ``uniform``
:class:`Quotient`   division of activations ``a / b`` (renormalised routing       ``quotient`` (AttnLRP, CP-LRP)
                    weights ``w / w.sum()``)
:class:`Elementwise` element-wise nonlinearities (ReLU, GELU, SiLU, tanh, ...)   ``passthrough`` (identity)
:class:`Normalization` ``layer_norm``, ``group_norm``, ``rms_norm``, training     ``normalization``
                    ``batch_norm``, ``instance_norm``, ``normalize``
:class:`Softmax`    ``softmax``                                                  ``softmax``
:class:`Selection`  max pooling, ``max``/``min``/``topk``, ``where``, ``maximum`` true gradient
:class:`DataMovement` views, ``cat``, indexing, ``pad``, dtype casts, dropout     true gradient
:class:`Attention`  ``scaled_dot_product_attention``, ``multi_head_attention_forward``  decomposed into the above
:class:`Other`      anything else                                                true gradient
==================  ===========================================================  ==============================

:class:`Linear` is the parent of the classes that are affine in their one activation operand; their parameter
operands (a weight, a bias) are the call's parameters (``Call.params``), so parameter-modifying rules (z+, gamma,
``zero_params="bias"``) act on them wherever the operation appears. Extend the table with :func:`register`, the way
JAX users register a primitive's rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "Operation",
    "Linear",
    "Dense",
    "Convolution",
    "AvgPool",
    "Resample",
    "Reduction",
    "Scale",
    "Shift",
    "BatchNorm",
    "Sum",
    "Product",
    "Quotient",
    "Elementwise",
    "Normalization",
    "Softmax",
    "Selection",
    "DataMovement",
    "Attention",
    "Other",
    "OpInfo",
    "classify",
    "class_of",
    "register",
    "registered",
]


class Operation:
    """Base of all operation classes."""


class Linear(Operation):
    """Affine in its one activation operand; the other tensor operands are the call's parameters."""


class Dense(Linear):
    """A matrix product with one activation operand: ``F.linear``, ``addmm``, ``matmul`` with a parameter."""


class Convolution(Linear):
    """A convolution or transposed convolution of an activation with a kernel."""


class AvgPool(Linear):
    """Average pooling (adaptive included)."""


class Resample(Linear):
    """Resampling that is linear in its input: ``interpolate`` with a (bi/tri)linear, bicubic or area mode."""


class Reduction(Linear):
    """A sum or mean over dimensions."""


class Scale(Linear):
    """Multiplication or division by a non-activation (a parameter, a buffer, a constant), or negation."""


class Shift(Linear):
    """Addition or subtraction of a non-activation (a bias)."""


class BatchNorm(Linear):
    """Batch normalisation with running statistics (eval mode): an affine map per channel."""


class Sum(Operation):
    """A sum (or difference) of two or more activations, e.g. a residual ``x + f(x)``."""


class Product(Operation):
    """A product of two or more activations: element-wise ``a * b``, ``a @ b``, ``bmm``, ``einsum``, gates."""


class Quotient(Operation):
    """A division of two activations ``a / b``: weights renormalised by their own sum (the routing weights of a mixture
    of experts), a softmax written out. Its output keeps the numerator's origin (a renormalised softmax is a gate)."""


class Elementwise(Operation):
    """An element-wise nonlinearity of one activation (ReLU, GELU, SiLU, sigmoid, tanh, exp, ...)."""


class Normalization(Operation):
    """Normalisation by statistics of the activation itself (LayerNorm, GroupNorm, RMSNorm, batch statistics)."""


class Softmax(Operation):
    """Softmax along one dimension."""


class Selection(Operation):
    """Selection by value (max pooling, ``max``, ``topk``, ``where``): the true gradient is winner takes all."""


class DataMovement(Operation):
    """Moves, copies or casts values without arithmetic (views, ``cat``, indexing, ``pad``, dropout in eval)."""


class Attention(Operation):
    """A fused attention operation; LRP composites decompose it into products, scaling and softmax."""


class Other(Operation):
    """An operation on activations that the table does not know; it keeps its true gradient by default."""


#: Classes whose output keeps the origin of its first activation operand (:attr:`lrpfunc.Call.input_sources`): data
#: movement, selection (the top-k of a softmax is still softmax weights) and a quotient (renormalised weights).
KEEPS_SOURCE: tuple[type, ...] = (DataMovement, Selection, Quotient)


@dataclass(frozen=True, slots=True)
class OpInfo:
    """The class of one recorded operation and its parameter operands.

    Attributes:
        op_class: One of the classes of this module (or a user's subclass of :class:`Operation`).
        params: The non-activation tensor operands that act as the call's parameters, by name (``"weight"``,
            ``"bias"``, ...); empty for classes without parameters.
    """

    op_class: type[Operation]
    params: Mapping[str, Tensor]


IsActivation = Callable[[Any], bool]
Classifier = Callable[[Sequence[Any], Mapping[str, Any], IsActivation], OpInfo]

_TABLE: dict[Any, Classifier] = {}
#: The class of functions whose class does not depend on their operands (most of them), for a fast lookup.
_CONSTANT: dict[Any, type[Operation]] = {}
_NO_PARAMS: Mapping[str, Tensor] = {}


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], position: int, name: str, default: Any = None) -> Any:
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def _tensors(named: Mapping[str, Any], is_activation: IsActivation) -> dict[str, Tensor]:
    return {name: value for name, value in named.items() if isinstance(value, Tensor) and not is_activation(value)}


def _constant(op_class: type[Operation]) -> Classifier:
    info = OpInfo(op_class, _NO_PARAMS)
    return lambda args, kwargs, is_activation: info


def _weighted(op_class: type[Operation], names: Sequence[tuple[int, str]]) -> Classifier:
    """A class whose parameters are the arguments at the given positions/names (``(1, "weight"), (2, "bias")``)."""

    def classify_(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
        named = {name: _arg(args, kwargs, position, name) for position, name in names}
        return OpInfo(op_class, _tensors(named, is_activation))

    return classify_


def _binary(both: type[Operation], one: type[Operation], param: str) -> Classifier:
    """``op(a, b)``: ``both`` when both operands are activations, else ``one`` with the other as ``param``."""

    def classify_(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
        first, second = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
        active = [is_activation(first), is_activation(second)]
        if all(active):
            return OpInfo(both, _NO_PARAMS)
        other = second if active[0] else first
        return OpInfo(one, {param: other} if isinstance(other, Tensor) else _NO_PARAMS)

    return classify_


def _add(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    return _binary(Sum, Shift, "bias")(args, kwargs, is_activation)


def _accumulating(position: int, name: str, flag: tuple[int, str] | None = None) -> Classifier:
    """``op(base, ..., source)`` that adds ``source`` into ``base`` at indices (``index_add``, ``scatter_add``,
    ``index_put(..., accumulate=True)``; how mixtures of experts gather their experts' outputs): a sum of activations
    when both are (several source elements may add into one output element: the sum rule splits among them all), else a
    shift by the constant operand (``"bias"``); with the ``flag`` argument false (``index_put`` without accumulate) it
    overwrites: data movement."""

    def classify_(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
        if flag is not None and not _arg(args, kwargs, flag[0], flag[1], False):
            return OpInfo(DataMovement, _NO_PARAMS)
        base, source = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, position, name)
        active = [is_activation(base), is_activation(source)]
        if all(active):
            return OpInfo(Sum, _NO_PARAMS)
        other = source if active[0] else base
        return OpInfo(Shift, {"bias": other} if isinstance(other, Tensor) else _NO_PARAMS)

    return classify_


def _mul(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    return _binary(Product, Scale, "weight")(args, kwargs, is_activation)


def _div(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    denominator = _arg(args, kwargs, 1, "other")
    if kwargs.get("rounding_mode") is not None:
        return OpInfo(Other, _NO_PARAMS)
    if is_activation(denominator):
        return OpInfo(Quotient if is_activation(_arg(args, kwargs, 0, "input")) else Other, _NO_PARAMS)
    return OpInfo(Scale, {"divisor": denominator} if isinstance(denominator, Tensor) else _NO_PARAMS)


def _rsub(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    # other - input (Tensor.__rsub__ / torch.rsub): affine in the activation
    other = _arg(args, kwargs, 1, "other")
    if is_activation(other):
        return OpInfo(Sum, _NO_PARAMS)
    return OpInfo(Shift, {"bias": other} if isinstance(other, Tensor) else _NO_PARAMS)


def _matmul(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    return _binary(Product, Dense, "weight")(args, kwargs, is_activation)


def _addmm(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    bias, first, second = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    if is_activation(first) and is_activation(second):
        return OpInfo(Product, _NO_PARAMS)
    weight = second if is_activation(first) else first
    return OpInfo(Dense, _tensors({"weight": weight, "bias": bias}, is_activation))


def _grouped_mm(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    """``grouped_mm(mat_a, mat_b, offs=..., bias=...)``: each group of rows of ``mat_a`` times its own matrix of
    ``mat_b`` (how a mixture of experts runs all experts at once): dense in the activation operand."""
    first, second = _arg(args, kwargs, 0, "mat_a"), _arg(args, kwargs, 1, "mat_b")
    if is_activation(first) and is_activation(second):
        return OpInfo(Product, _NO_PARAMS)
    weight = second if is_activation(first) else first
    return OpInfo(Dense, _tensors({"weight": weight, "bias": _arg(args, kwargs, 3, "bias")}, is_activation))


def _einsum(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    active = [operand for operand in operands if is_activation(operand)]
    if len(active) >= 2:
        return OpInfo(Product, _NO_PARAMS)
    constants = [operand for operand in operands if isinstance(operand, Tensor) and not is_activation(operand)]
    if len(constants) == 1:
        return OpInfo(Dense, {"weight": constants[0]})
    return OpInfo(Dense, {f"operand{index}": operand for index, operand in enumerate(constants)})


def _batch_norm(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    running_mean, running_var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    training = _arg(args, kwargs, 5, "training", False)
    named = {
        "weight": _arg(args, kwargs, 3, "weight"),
        "bias": _arg(args, kwargs, 4, "bias"),
        "running_mean": running_mean,
        "running_var": running_var,
    }
    op_class = Normalization if training or running_mean is None or running_var is None else BatchNorm
    return OpInfo(op_class, _tensors(named, is_activation))


def _interpolate(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    mode = _arg(args, kwargs, 3, "mode", "nearest")
    return OpInfo(DataMovement if mode in ("nearest", "nearest-exact") else Resample, _NO_PARAMS)


def _pow(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    base, exponent = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "exponent")
    if is_activation(base) and is_activation(exponent):
        return OpInfo(Other, _NO_PARAMS)
    if not is_activation(base):  # c ** x
        return OpInfo(Elementwise, _NO_PARAMS)
    if isinstance(exponent, (int, float)) and exponent == 1:
        return OpInfo(DataMovement, _NO_PARAMS)
    return OpInfo(Elementwise, _NO_PARAMS)


def _where(args: Sequence[Any], kwargs: Mapping[str, Any], is_activation: IsActivation) -> OpInfo:
    return OpInfo(Selection, _NO_PARAMS)


def _names(owner: Any, names: str) -> list[Any]:
    found = []
    for name in names.split():
        value = getattr(owner, name, None)
        if value is not None:
            found.append(value)
    return found


def _all(names: str) -> list[Any]:
    """``torch.X``, ``torch.Tensor.X`` and ``torch.nn.functional.X`` for each name, where they exist."""
    return _names(torch, names) + _names(Tensor, names) + _names(F, names)


def register(func: Callable[..., Any], op_class: type[Operation] | Classifier, *,
             params: Sequence[tuple[int, str]] = ()) -> None:
    """Tell the tracer what class of operation ``func`` is.

    Args:
        func: The function or method as the model calls it (``torch.special.erf``, ``torch.Tensor.erf``, a custom
            ``torch.library`` operator, or a :class:`torch.autograd.Function` subclass's ``apply``).
        op_class: A subclass of :class:`Operation`, or a classifier ``(args, kwargs, is_activation) -> OpInfo``
            for a function whose class depends on which operands are activations.
        params: For a class: ``(position, name)`` of the arguments that are the call's parameters, e.g.
            ``[(1, "weight"), (2, "bias")]`` (the name is also the keyword-argument name).

    Example:
        >>> register(torch.special.erf, Elementwise)
    """
    if isinstance(op_class, type):
        if not issubclass(op_class, Operation):
            raise TypeError(f"register: op_class must be a subclass of lrpfunc.ops.Operation, got {op_class.__name__}")
        _TABLE[func] = _weighted(op_class, params) if params else _constant(op_class)
        _CONSTANT[func] = op_class
    elif callable(op_class):
        if params:
            raise TypeError("register: params is given by the classifier itself when op_class is a classifier")
        _TABLE[func] = op_class
        _CONSTANT.pop(func, None)
    else:
        raise TypeError(
            f"register: op_class must be an Operation subclass or a classifier, got {type(op_class).__name__}"
        )


def registered(func: Callable[..., Any]) -> bool:
    """Whether ``func`` has an entry in the table."""
    return func in _TABLE


def classify(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
             is_activation: IsActivation) -> OpInfo:
    """The :class:`OpInfo` of ``func(*args, **kwargs)``; ``is_activation(value)`` tells activation operands."""
    classifier = _TABLE.get(func)
    if classifier is None:
        return OpInfo(Other, _NO_PARAMS)
    return classifier(args, kwargs, is_activation)


def class_of(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
             is_activation: IsActivation) -> type[Operation]:
    """Only the class of ``func(*args, **kwargs)`` (what :func:`classify` returns, without the parameters)."""
    found = _CONSTANT.get(func)
    if found is not None:
        return found
    classifier = _TABLE.get(func)
    if classifier is None:
        return Other
    return classifier(args, kwargs, is_activation).op_class


def _register_builtins() -> None:
    for func in [F.linear]:
        register(func, Dense, params=[(1, "weight"), (2, "bias")])
    for func in _all("addmm"):
        register(func, _addmm)
    for func in _all("matmul mm bmm") + [Tensor.__matmul__]:
        register(func, _matmul)
    register(Tensor.__rmatmul__, lambda args, kwargs, act: _matmul((args[1], args[0]), {}, act))
    register(torch.einsum, _einsum)
    for func in _all("grouped_mm _grouped_mm"):
        register(func, _grouped_mm)
    for func in _all("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d"):
        register(func, Convolution, params=[(1, "weight"), (2, "bias")])
    for func in _all("avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d"):
        register(func, AvgPool)
    register(F.interpolate, _interpolate)
    for func in _all("sum mean nansum cumsum"):
        register(func, Reduction)
    for func in _all("add") + [Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.add_]:
        register(func, _add)
    for func in _all("sub subtract") + [Tensor.__sub__, Tensor.__isub__, Tensor.sub_]:
        register(func, _add)
    for func in _all("index_add index_add_"):
        register(func, _accumulating(3, "source"))
    for func in _all("scatter_add scatter_add_"):
        register(func, _accumulating(3, "src"))
    for func in _all("index_put index_put_"):
        register(func, _accumulating(2, "values", flag=(3, "accumulate")))
    for func in _all("rsub") + [Tensor.__rsub__]:
        register(func, _rsub)
    for func in _all("mul multiply") + [Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__, Tensor.mul_]:
        register(func, _mul)
    for func in _all("div divide true_divide") + [Tensor.__truediv__, Tensor.__itruediv__, Tensor.div_]:
        register(func, _div)
    for func in _all("neg negative") + [Tensor.__neg__]:
        register(func, Scale)
    for func in _all("pow") + [Tensor.__pow__, Tensor.__ipow__]:
        register(func, _pow)
    elementwise = (
        "relu relu_ relu6 hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ gelu silu mish "
        "softplus hardswish hardsigmoid sigmoid sigmoid_ tanh tanh_ logsigmoid softsign tanhshrink threshold "
        "threshold_ rrelu glu exp exp_ expm1 log log_ log1p log2 sqrt sqrt_ rsqrt rsqrt_ square abs abs_ sin cos erf "
        "erfc reciprocal reciprocal_ clamp clamp_ clip clip_ clamp_min clamp_max sign softshrink hardshrink logit"
    )
    for func in _all(elementwise) + [Tensor.__rtruediv__, Tensor.__rpow__, Tensor.__abs__]:
        register(func, Elementwise)
    register(F.prelu, Elementwise, params=[(1, "weight")])
    register(torch.prelu, Elementwise, params=[(1, "weight")])
    for func in _all("layer_norm"):
        register(func, Normalization, params=[(2, "weight"), (3, "bias")])
    for func in _all("group_norm"):
        register(func, Normalization, params=[(2, "weight"), (3, "bias")])
    for func in _all("rms_norm"):
        register(func, Normalization, params=[(2, "weight")])
    for func in _all("instance_norm"):
        register(func, Normalization, params=[(3, "weight"), (4, "bias")])
    for func in _all("local_response_norm normalize"):
        register(func, Normalization)
    for func in _all("batch_norm"):
        register(func, _batch_norm)
    for func in _all("softmax _softmax"):
        register(func, Softmax)
    selection = (
        "max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices "
        "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d max min amax amin topk maximum minimum fmax fmin "
        "median kthvalue sort msort cummax cummin"
    )
    for func in _all(selection):
        register(func, Selection)
    for func in _all("where masked_fill masked_fill_"):
        register(func, _where)
    movement = (
        "view view_as reshape reshape_as flatten unflatten permute transpose swapaxes swapdims movedim moveaxis t "
        "squeeze unsqueeze expand expand_as repeat repeat_interleave tile broadcast_to cat concat concatenate stack "
        "hstack vstack dstack split split_with_sizes tensor_split chunk unbind narrow select index_select gather "
        "take_along_dim __getitem__ pad contiguous clone to float double half bfloat16 type type_as flip fliplr flipud "
        "roll dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout pixel_shuffle pixel_unshuffle "
        "diagonal triu tril unfold fold narrow_copy as_strided alias detach masked_select "
        "scatter diag_embed channel_shuffle cumsum"
    )
    for func in _all(movement) + [Tensor.__setitem__]:
        register(func, DataMovement)
    for getter in (Tensor.T, Tensor.mT, Tensor.H, Tensor.mH, Tensor.real, Tensor.imag):
        register(getter.__get__, DataMovement)  # type: ignore[attr-defined]  # torch's stubs type these as tensors
    register(F.scaled_dot_product_attention, Attention)
    register(F.multi_head_attention_forward, Attention)


_register_builtins()

#: Data movement that adds values up: its pullback of a gradient is not that of a relevance.
_SUMMING = frozenset(_all("cumsum scatter_add fold index_put index_put_ index_add index_add_ scatter_reduce"))


def moves_values(func: Callable[..., Any], op_class: type | None) -> bool:
    """Whether every output element of ``func`` is one input element (data movement, selection, ``where``), so that
    its pullback moves a cotangent alongside the value it belongs to: ``value * gradient`` is pulled back like the
    relevance it equals. Sums (``cumsum``, ``scatter_add``, ``fold``) are not."""
    if op_class is Selection:
        return True
    return op_class is DataMovement and func not in _SUMMING


# ------------------------------------------------------------------------------------------------------------
# transposes: the vector-Jacobian product of a linear operation w.r.t. its activation operand, in closed form
# ------------------------------------------------------------------------------------------------------------

Transpose = Callable[[Tensor, Tensor, Tensor, Sequence[Any], Mapping[str, Any]], Tensor]


def _tuple(value: Any, count: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * count


def _linear_transpose(grad: Tensor, weight: Tensor, input: Tensor, args: Sequence[Any],  # noqa: A002
                      kwargs: Mapping[str, Any]) -> Tensor:
    return grad @ weight


def _convolution_transpose(dims: int) -> Transpose:
    def transpose(grad: Tensor, weight: Tensor, input: Tensor, args: Sequence[Any],  # noqa: A002
                  kwargs: Mapping[str, Any]) -> Tensor:
        stride = _tuple(_arg(args, kwargs, 3, "stride", 1), dims)
        padding = _tuple(_arg(args, kwargs, 4, "padding", 0), dims)
        dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), dims)
        groups = _arg(args, kwargs, 6, "groups", 1)
        # the input gradient of a convolution, as autograd computes it (exact, with derivatives, vmap and jvp rules)
        return torch.ops.aten.convolution_backward(
            grad, input, weight, None, stride, padding, dilation, False, (0,) * dims, groups, (True, False, False)
        )[0]

    return transpose


def _transposed_convolution_transpose(dims: int) -> Transpose:
    forward = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]

    def transpose(grad: Tensor, weight: Tensor, input: Tensor, args: Sequence[Any],  # noqa: A002
                  kwargs: Mapping[str, Any]) -> Tensor:
        stride = _arg(args, kwargs, 3, "stride", 1)
        padding = _arg(args, kwargs, 4, "padding", 0)
        groups = _arg(args, kwargs, 6, "groups", 1)
        dilation = _arg(args, kwargs, 7, "dilation", 1)
        return forward(grad, weight, None, stride, padding, dilation, groups)

    return transpose


def _padding_is_explicit(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    return not isinstance(_arg(args, kwargs, 4, "padding", 0), str)


_TRANSPOSES: dict[Any, tuple[Transpose, Callable[[Sequence[Any], Mapping[str, Any]], bool]]] = {}


def _register_transposes() -> None:
    always = lambda args, kwargs: True  # noqa: E731
    _TRANSPOSES[F.linear] = (_linear_transpose, lambda args, kwargs: isinstance(_arg(args, kwargs, 1, "weight"), Tensor)
                             and _arg(args, kwargs, 1, "weight").ndim == 2)
    for dims, names in ((1, "conv1d"), (2, "conv2d"), (3, "conv3d")):
        for func in _all(names):
            _TRANSPOSES[func] = (_convolution_transpose(dims), _padding_is_explicit)
    for dims, names in ((1, "conv_transpose1d"), (2, "conv_transpose2d"), (3, "conv_transpose3d")):
        for func in _all(names):
            _TRANSPOSES[func] = (_transposed_convolution_transpose(dims), always)


_register_transposes()


def transpose_of(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Transpose | None:
    """The closed-form transpose of ``func(input, weight, ...)`` w.r.t. ``input`` for these arguments, if known.

    The transpose is called as ``transpose(grad, weight, input, args, kwargs)`` and is made of ordinary
    differentiable torch operations, so it is exact under every transform; the engine uses it instead of recording
    a pullback for calls that are one such operation (``nn.Linear``, ``nn.Conv2d``, also with a BatchNorm folded in).
    """
    entry = _TRANSPOSES.get(func)
    if entry is None or not entry[1](args, kwargs):
        return None
    return entry[0]


def _sum_pullback(sign: float) -> Callable[..., tuple[Tensor, Tensor]]:
    def pullback(grad: Tensor, first: Tensor, second: Tensor, args: Sequence[Any],
                 kwargs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        other = grad.sum_to_size(second.shape)
        factor = sign * alpha
        return grad.sum_to_size(first.shape), (other if factor == 1 else other * factor)

    return pullback


_SUM_PULLBACKS: dict[Any, Callable[..., tuple[Tensor, Tensor]]] = {}
for _func in _all("add") + [Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.add_]:
    _SUM_PULLBACKS[_func] = _sum_pullback(1.0)
for _func in _all("sub subtract") + [Tensor.__sub__, Tensor.__isub__, Tensor.sub_]:
    _SUM_PULLBACKS[_func] = _sum_pullback(-1.0)


def sum_pullback_of(func: Callable[..., Any]) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """The closed-form pullback ``(grad, a, b, args, kwargs) -> (grad_a, grad_b)`` of ``func(a, b)`` (an addition or
    subtraction of two activations, broadcasting and ``alpha`` included), if it is one."""
    return _SUM_PULLBACKS.get(func)
