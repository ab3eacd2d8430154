"""Random small architectures for property tests: pieces composed at random, float64, tiny widths.

An architecture is a stem, a few blocks and a head (:class:`Net`). Each block is one *piece* (a linear map,
an activation, an in-place activation, a residual, a gate, a concatenation, a split, a view, a norm, a BatchNorm
after a linear map, attention, a pool, a buffer updated in forward, ...) in one of several *forms* (module,
functional, in place, ...). Three layouts: vectors ``(B, C)``, sequences ``(B, T, C)`` (optionally with integer
token ids as a second input, the model then takes ``(ids, x)``) and images ``(B, C, H, W)``.

Choices come from a :class:`Chooser`: :func:`architectures` draws them with hypothesis, :func:`sample` with
``random.Random`` (for surveys: ``python tests/architectures.py 2000`` checks every property on 2000 models with
every piece and prints, per failure category, how many models hit it and which pieces they hold).

Switches: :data:`KNOWN_DEFECTS` lists the pieces and forms whose defects are not fixed yet, each with the defect it
shows; :func:`architectures` leaves them out of the sample unless ``LRPFUNC_PROPERTY_ALL=1`` is set (or
``include_known_defects=True``). Remove an entry when its fix lands.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from models import randomize_batchnorm
from torch import Tensor, nn

D = torch.float64
T_ = TypeVar("T_")

# ---------------------------------------------------------------------------------------------------------------
# switches
# ---------------------------------------------------------------------------------------------------------------

#: ``"piece"`` or ``"piece/form"`` -> the defect it shows on the current engine. Left out of the CI sample (and
#: listed in the survey as expected failures) until the defect is fixed; delete the entry with the fix.
KNOWN_DEFECTS: dict[str, str] = {
}


def include_known_defects() -> bool:
    """``LRPFUNC_PROPERTY_ALL=1``: sample the pieces of :data:`KNOWN_DEFECTS` too (to check a fix)."""
    return os.environ.get("LRPFUNC_PROPERTY_ALL", "") not in ("", "0")


def _excluded(piece: str, form: str, excluded: frozenset[str]) -> bool:
    return piece in excluded or f"{piece}/{form}" in excluded


# ---------------------------------------------------------------------------------------------------------------
# choosers
# ---------------------------------------------------------------------------------------------------------------


class Chooser(Protocol):
    """Where the random choices come from (hypothesis or ``random.Random``)."""

    def integer(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence[T_]) -> T_: ...


class RandomChooser:
    """Choices from ``random.Random(seed)``."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.random.randint(low, high)

    def choice(self, options: Sequence[T_]) -> T_:
        return self.random.choice(list(options))


class DrawChooser:
    """Choices drawn by hypothesis (shrinkable)."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options: Sequence[T_]) -> T_:
        return self.draw(st.sampled_from(list(options)))


# ---------------------------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a piece is built for: the layout, the width, whether it may have biases."""

    layout: str  # "vector", "sequence" or "image"
    width: int
    bias: bool
    length: int  # sequence length T (sequence layout)


def _linear(ctx: Context, fan_in: int | None = None, fan_out: int | None = None) -> nn.Linear:
    return nn.Linear(fan_in or ctx.width, fan_out or ctx.width, bias=ctx.bias)


def _channel_map(ctx: Context, fan_out: int | None = None) -> nn.Module:
    """A width-preserving linear map over the channels of the layout (Linear, or a 1x1 Conv2d on images)."""
    if ctx.layout == "image":
        return nn.Conv2d(ctx.width, fan_out or ctx.width, 1, bias=ctx.bias)
    return _linear(ctx, fan_out=fan_out)


def _channel_dim(ctx: Context) -> int:
    return 1 if ctx.layout == "image" else -1


ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "ReLU": nn.ReLU, "GELU": nn.GELU, "SiLU": nn.SiLU, "Tanh": nn.Tanh, "Hardswish": nn.Hardswish, "ReLU6": nn.ReLU6,
}
ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"F.relu": F.relu, "torch.tanh": torch.tanh, "F.silu": F.silu}


class Block(nn.Module):
    """A piece in one form; ``conserves``: bias-free, it conserves relevance under the epsilon-0 composite."""

    piece = ""
    conserves = True
    has_batchnorm = False

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def describe(self) -> str:
        return f"{self.piece}/{self.form}"

    def folded(self) -> Block:
        """The same function with every BatchNorm folded by hand into the linear map before it."""
        return self


class Activation(Block):
    piece = "activation"
    FORMS = tuple(ACTIVATION_MODULES) + tuple(ACTIVATION_FUNCTIONS)

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        if form in ACTIVATION_MODULES:
            self.act = ACTIVATION_MODULES[form]()

    def forward(self, h: Tensor) -> Tensor:
        return self.act(h) if self.form in ACTIVATION_MODULES else ACTIVATION_FUNCTIONS[self.form](h)


class LinearMap(Block):
    piece = "linear"
    FORMS = ("Linear", "F.linear", "tied", "Conv1d", "Conv2d", "F.conv2d")

    @staticmethod
    def forms(ctx: Context) -> tuple[str, ...]:
        return {"vector": ("Linear", "F.linear", "tied"), "sequence": ("Linear", "F.linear", "tied", "Conv1d"),
                "image": ("Conv2d", "F.conv2d", "tied")}[ctx.layout]

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        c = ctx.width
        if form == "Linear":
            self.layer = _linear(ctx)
        elif form == "F.linear":
            self.weight = nn.Parameter(torch.randn(c, c) / math.sqrt(c))
            self.bias = nn.Parameter(torch.randn(c) * 0.1) if ctx.bias else None
        elif form == "tied":
            self.layer = _channel_map(ctx)
            self.act = nn.ReLU()
        elif form == "Conv1d":
            self.layer = nn.Conv1d(c, c, 3, padding=1, bias=ctx.bias)
        elif form == "Conv2d":
            self.layer = nn.Conv2d(c, c, 3, padding=1, bias=ctx.bias)
        elif form == "F.conv2d":
            self.weight = nn.Parameter(torch.randn(c, c, 3, 3) / math.sqrt(9 * c))
            self.bias = nn.Parameter(torch.randn(c) * 0.1) if ctx.bias else None

    def forward(self, h: Tensor) -> Tensor:
        if self.form == "F.linear":
            return F.linear(h, self.weight, self.bias)
        if self.form == "F.conv2d":
            return F.conv2d(h, self.weight, self.bias, padding=1)
        if self.form == "tied":
            return self.layer(self.act(self.layer(h)))
        if self.form == "Conv1d":
            return self.layer(h.transpose(1, 2)).transpose(1, 2)
        return self.layer(h)


class InPlace(Block):
    """A fresh linear output activated in place."""

    piece = "inplace"
    FORMS = ("ReLU(inplace)", "Hardswish(inplace)", "relu_", "tanh_", "clamp_", "F.silu(inplace)", "leaky_relu_")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.layer = _channel_map(ctx)
        if form == "ReLU(inplace)":
            self.act = nn.ReLU(inplace=True)
        elif form == "Hardswish(inplace)":
            self.act = nn.Hardswish(inplace=True)

    def forward(self, h: Tensor) -> Tensor:
        h = self.layer(h)
        if self.form in ("ReLU(inplace)", "Hardswish(inplace)"):
            return self.act(h)
        if self.form == "relu_":
            h.relu_()
        elif self.form == "tanh_":
            h.tanh_()
        elif self.form == "clamp_":
            h.clamp_(min=0)
        elif self.form == "F.silu(inplace)":
            F.silu(h, inplace=True)
        elif self.form == "leaky_relu_":
            F.leaky_relu_(h)
        return h


class InPlaceAliased(Block):
    """In-place activations whose input is also read through another reference afterwards."""

    piece = "inplace_aliased"
    FORMS = ("preact_residual", "relu_then_same_layer", "x_minus_leaky_relu_", "cat_tanh_", "add_self_")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.layer = _channel_map(ctx)
        self.out = _channel_map(ctx)
        if form == "cat_tanh_":
            self.out = _channel_map(ctx) if ctx.layout == "image" else None
            self.down = (nn.Conv2d(2 * ctx.width, ctx.width, 1, bias=ctx.bias) if ctx.layout == "image"
                         else _linear(ctx, fan_in=2 * ctx.width))
        self.dim = _channel_dim(ctx)

    def forward(self, h: Tensor) -> Tensor:
        h = self.layer(h)
        if self.form == "preact_residual":
            identity = h
            h = F.relu_(h)
            return self.out(h) + identity
        if self.form == "relu_then_same_layer":
            h.relu_()
            return self.layer(h)
        if self.form == "x_minus_leaky_relu_":
            return self.out(h - F.leaky_relu_(h))
        if self.form == "cat_tanh_":
            return self.down(torch.cat([h, h.tanh_()], self.dim))
        return self.out(h.add_(h))


class Residual(Block):
    piece = "residual"
    FORMS = ("h + f(h)", "f(h) + h", "torch.add", "out += h", "h + f(h) (deep)", "relu(h) - relu(f(h))")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.f = (nn.Sequential(_channel_map(ctx), nn.ReLU(), _channel_map(ctx)) if form == "h + f(h) (deep)"
                  else _channel_map(ctx))

    def forward(self, h: Tensor) -> Tensor:
        if self.form in ("h + f(h)", "h + f(h) (deep)"):
            return h + self.f(h)
        if self.form == "f(h) + h":
            return self.f(h) + h
        if self.form == "torch.add":
            return torch.add(h, self.f(h))
        if self.form == "relu(h) - relu(f(h))":  # a difference of non-negative values: it has a negative part
            return F.relu(h) - F.relu(self.f(h))
        out = self.f(h)
        out += h
        return out


class Gate(Block):
    piece = "gate"
    FORMS = ("a * sigmoid(b)", "a * b", "silu(a) * b")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.a, self.b = _channel_map(ctx), _channel_map(ctx)

    def forward(self, h: Tensor) -> Tensor:
        a, b = self.a(h), self.b(h)
        if self.form == "a * sigmoid(b)":
            return a * torch.sigmoid(b)
        if self.form == "a * b":
            return a * b
        return F.silu(a) * b


class Concat(Block):
    piece = "concat"
    FORMS = ("two_maps", "with_activation")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.a, self.b = _channel_map(ctx), nn.Tanh() if form == "with_activation" else _channel_map(ctx)
        self.down = (nn.Conv2d(2 * ctx.width, ctx.width, 1, bias=ctx.bias) if ctx.layout == "image"
                     else _linear(ctx, fan_in=2 * ctx.width))
        self.dim = _channel_dim(ctx)

    def forward(self, h: Tensor) -> Tensor:
        if self.form == "two_maps":
            return self.down(torch.cat([self.a(h), self.b(h)], self.dim))
        return self.down(torch.cat([h, self.b(h)], self.dim))


class Split(Block):
    piece = "split"
    FORMS = ("chunk_sum", "chunk_product", "split_cat_reversed")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.up = _channel_map(ctx, fan_out=2 * ctx.width)
        self.width, self.dim = ctx.width, _channel_dim(ctx)
        if form == "split_cat_reversed":
            self.down = (nn.Conv2d(2 * ctx.width, ctx.width, 1, bias=ctx.bias) if ctx.layout == "image"
                         else _linear(ctx, fan_in=2 * ctx.width))

    def forward(self, h: Tensor) -> Tensor:
        u = self.up(h)
        if self.form == "chunk_sum":
            a, b = u.chunk(2, self.dim)
            return a + b
        if self.form == "chunk_product":
            a, b = u.chunk(2, self.dim)
            return a * b
        a, b = torch.split(u, self.width, self.dim)
        return self.down(torch.cat([b, a], self.dim))


class View(Block):
    piece = "view"
    FORMS = ("reshape_transpose", "permute_mix", "flatten_unflatten")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.layout, self.width = ctx.layout, ctx.width
        self.layer = _channel_map(ctx)
        if ctx.layout == "sequence" and form == "permute_mix":
            self.layer = _linear(ctx, fan_in=ctx.length, fan_out=ctx.length)  # mixes the positions

    def forward(self, h: Tensor) -> Tensor:
        if self.layout == "image":
            if self.form == "flatten_unflatten":
                return self.layer(h.flatten(2).unflatten(2, h.shape[2:]))
            return self.layer(h.permute(0, 2, 3, 1).permute(0, 3, 1, 2))
        if self.form == "reshape_transpose":
            shape = h.shape
            return self.layer(h.reshape(*shape[:-1], 2, -1).transpose(-1, -2).reshape(shape))
        if self.form == "permute_mix" and self.layout == "sequence":
            return self.layer(h.permute(0, 2, 1)).permute(0, 2, 1)
        shape = h.shape
        return self.layer(h.flatten(1).view(shape))


class RMSNorm(nn.Module):
    """RMSNorm written by hand (Llama's form)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Norm(Block):
    piece = "norm"
    FORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "F.layer_norm")

    @staticmethod
    def forms(ctx: Context) -> tuple[str, ...]:
        return ("GroupNorm",) if ctx.layout == "image" else ("LayerNorm", "RMSNorm", "F.layer_norm")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.layer = _channel_map(ctx)
        c = ctx.width
        if form == "LayerNorm":
            self.norm = nn.LayerNorm(c, bias=ctx.bias)
        elif form == "RMSNorm":
            self.norm = RMSNorm(c)
        elif form == "GroupNorm":
            # groups of two channels or more: a channel normalised alone has spatial mean exactly 0, and a global
            # average pool after it divides by ~1e-17 (a degenerate model, not a defect)
            self.norm = nn.GroupNorm(c // 2 if c >= 4 else 1, c, affine=ctx.bias)
        else:
            self.weight = nn.Parameter(1 + 0.1 * torch.randn(c))
        self.width = c
        with torch.no_grad():
            for name, param in self.norm.named_parameters() if form != "F.layer_norm" else ():
                param.add_(0.1 * torch.randn_like(param))

    def forward(self, h: Tensor) -> Tensor:
        h = self.layer(h)
        if self.form == "F.layer_norm":
            return F.layer_norm(h, (self.width,), self.weight)
        return self.norm(h)


class BatchNormAfter(Block):
    """A linear map followed by an eval-mode BatchNorm (what ``merge_batchnorm`` folds)."""

    piece = "batchnorm"
    conserves = True  # under the epsilon-0 composite without canonizer, BatchNorm gets passthrough
    has_batchnorm = True
    FORMS = ("Conv2d", "F.conv2d", "read_outside", "Linear", "F.linear")

    @staticmethod
    def forms(ctx: Context) -> tuple[str, ...]:
        return {"vector": ("Linear", "F.linear", "read_outside"), "image": ("Conv2d", "F.conv2d", "read_outside")}.get(
            ctx.layout, ())

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        c, image = ctx.width, ctx.layout == "image"
        self.image = image
        if form in ("F.conv2d", "F.linear"):
            self.weight = nn.Parameter(torch.randn(c, c, 3, 3) / math.sqrt(9 * c) if image else torch.randn(c, c) / math.sqrt(c))
            self.bias = nn.Parameter(torch.randn(c) * 0.1) if ctx.bias else None
        else:
            self.layer = nn.Conv2d(c, c, 3, padding=1, bias=ctx.bias) if image else _linear(ctx)
        self.bn = nn.BatchNorm2d(c) if image else nn.BatchNorm1d(c)
        randomize_batchnorm(self.bn)

    def linear(self, h: Tensor) -> Tensor:
        if self.form in ("F.conv2d", "F.linear"):
            return F.conv2d(h, self.weight, self.bias, padding=1) if self.image else F.linear(h, self.weight, self.bias)
        return self.layer(h)

    def forward(self, h: Tensor) -> Tensor:
        c = self.linear(h)
        if self.form == "read_outside":
            return c + self.bn(c)
        return self.bn(c)

    def folded(self) -> Block:
        return FoldedBatchNorm(self)


class FoldedBatchNorm(Block):
    """:class:`BatchNormAfter` with the BatchNorm folded by hand (the reference for ``merge_batchnorm``)."""

    piece = "batchnorm_folded"

    def __init__(self, block: BatchNormAfter) -> None:
        super().__init__(block.form)
        self.original = copy.deepcopy(block)
        bn = block.bn
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = block.weight if block.form in ("F.conv2d", "F.linear") else block.layer.weight
            bias = block.bias if block.form in ("F.conv2d", "F.linear") else block.layer.bias
            merged_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
            merged_bias = (-bn.running_mean if bias is None else bias - bn.running_mean) * scale + bn.bias
        self.image = block.image
        self.merged = (nn.Conv2d(*weight.shape[:2], 3, padding=1, dtype=D) if self.image
                       else nn.Linear(weight.shape[1], weight.shape[0], dtype=D))
        with torch.no_grad():
            self.merged.weight.copy_(merged_weight)
            self.merged.bias.copy_(merged_bias)

    def forward(self, h: Tensor) -> Tensor:
        if self.form == "read_outside":
            # the linear map's output is read besides the BatchNorm: folding would change what that read sees, so
            # merge_batchnorm leaves the BatchNorm as a call site of its own (the model as it is)
            return self.original(h)
        return self.merged(h)


class Attention(Block):
    """Self-attention over the sequence: written out, ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``."""

    piece = "attention"
    conserves = False  # the softmax rule does not conserve
    FORMS = ("matmul_1head", "matmul_2heads", "sdpa", "MultiheadAttention")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        c = ctx.width
        self.heads = 2 if form in ("matmul_2heads", "sdpa") and c % 2 == 0 else 1
        if form == "MultiheadAttention":
            self.mha = nn.MultiheadAttention(c, self.heads, bias=ctx.bias, batch_first=True)
        else:
            self.q, self.k, self.v, self.o = (_linear(ctx) for _ in range(4))

    def forward(self, h: Tensor) -> Tensor:
        if self.form == "MultiheadAttention":
            return self.mha(h, h, h, need_weights=False)[0]
        b, t, c = h.shape
        q, k, v = (layer(h).view(b, t, self.heads, c // self.heads).transpose(1, 2) for layer in (self.q, self.k, self.v))
        if self.form == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
            a = torch.softmax(scores, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, c))


class Pool(Block):
    piece = "pool"
    FORMS = ("MaxPool2d", "AvgPool2d", "F.max_pool2d", "F.avg_pool2d", "avg_pool1d", "max_pool1d")

    @staticmethod
    def forms(ctx: Context) -> tuple[str, ...]:
        return {"image": ("MaxPool2d", "AvgPool2d", "F.max_pool2d", "F.avg_pool2d"),
                "sequence": ("avg_pool1d", "max_pool1d")}.get(ctx.layout, ())

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.layer = _channel_map(ctx)
        if form == "MaxPool2d":
            self.pool = nn.MaxPool2d(3, 1, 1)
        elif form == "AvgPool2d":
            self.pool = nn.AvgPool2d(3, 1, 1)

    def forward(self, h: Tensor) -> Tensor:
        h = self.layer(h)
        if self.form in ("MaxPool2d", "AvgPool2d"):
            return self.pool(h)
        if self.form == "F.max_pool2d":
            return F.max_pool2d(h, 2, 1, padding=1)[..., 1:, 1:]
        if self.form == "F.avg_pool2d":
            return F.avg_pool2d(h, 3, 1, 1, count_include_pad=False)
        pool = F.avg_pool1d if self.form == "avg_pool1d" else F.max_pool1d
        return pool(h.transpose(1, 2), 3, 1, 1).transpose(1, 2)


class Buffer(Block):
    """A buffer updated in forward (a counter, a running statistic); the output does not read it."""

    piece = "buffer"
    FORMS = ("count += 1", "running_stat")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.layer = _channel_map(ctx)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(ctx.width))

    def forward(self, h: Tensor) -> Tensor:
        h = self.layer(h)
        if self.form == "count += 1":
            self.count += 1
        else:
            dims = [d for d in range(h.dim()) if d != (1 if h.dim() == 4 else h.dim() - 1)]
            self.running.mul_(0.9).add_(0.1 * h.detach().mean(dims))
        return h


class ScaledByBuffer(Block):
    """A constant buffer read (not written) in forward."""

    piece = "buffer_read"
    FORMS = ("h * buffer",)

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        shape = (ctx.width, 1, 1) if ctx.layout == "image" else (ctx.width,)
        self.register_buffer("scale", 0.5 + torch.rand(shape))
        self.layer = _channel_map(ctx)

    def forward(self, h: Tensor) -> Tensor:
        return self.layer(h) * self.scale


class IndexAdd(Block):
    """A scatter-add with repeated indices over the last dimension."""

    piece = "index_add"
    FORMS = ("index_add",)

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.layer = _channel_map(ctx)
        self.register_buffer("index", torch.tensor([i // 2 for i in range(ctx.width)]))

    def forward(self, h: Tensor) -> Tensor:
        h = self.layer(h)
        return torch.zeros_like(h).index_add(h.dim() - 1, self.index, h)


class ConstantNorm(Block):
    """A LayerNorm of a constant added to the activation."""

    piece = "constant_norm"
    conserves = False
    FORMS = ("LayerNorm(buffer)", "LayerNorm(ones_like)")

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.norm = nn.LayerNorm(ctx.width)
        self.register_buffer("constant", torch.randn(ctx.width))

    def forward(self, h: Tensor) -> Tensor:
        if self.form == "LayerNorm(buffer)":
            return h + self.norm(self.constant)
        return h + self.norm(torch.ones_like(h) * torch.arange(h.shape[-1], dtype=h.dtype))


class ZeroOutput(Block):
    """Relevance seeded on values that are exactly zero: a ReLU output concatenated into the model's output."""

    piece = "zero_output"
    FORMS = ("cat([relu(h), f(relu(h))])",)

    def __init__(self, form: str, ctx: Context) -> None:
        super().__init__(form)
        self.layer = _channel_map(ctx)
        self.f = _channel_map(ctx)

    def forward(self, h: Tensor) -> Tensor:  # the head is the identity after this block (see Net)
        h = F.relu(self.layer(h))
        return torch.cat([h, self.f(h)], -1 if h.dim() < 4 else 1)


PIECES: dict[str, type[Block]] = {
    cls.piece: cls
    for cls in (Activation, LinearMap, InPlace, InPlaceAliased, Residual, Gate, Concat, Split, View, Norm,
                BatchNormAfter, Attention, Pool, Buffer, ScaledByBuffer, IndexAdd, ConstantNorm)
}
LAYOUTS: dict[str, tuple[str, ...]] = {
    "vector": ("activation", "linear", "inplace", "inplace_aliased", "residual", "gate", "concat", "split", "view",
               "norm", "batchnorm", "buffer", "buffer_read", "index_add", "constant_norm"),
    "sequence": ("activation", "linear", "inplace", "inplace_aliased", "residual", "gate", "concat", "split", "view",
                 "norm", "attention", "attention", "pool", "buffer", "index_add", "constant_norm"),
    "image": ("activation", "linear", "inplace", "inplace_aliased", "residual", "gate", "concat", "split", "view",
              "norm", "batchnorm", "batchnorm", "pool", "buffer", "buffer_read"),
}


def _forms(cls: type[Block], ctx: Context) -> tuple[str, ...]:
    forms = getattr(cls, "forms", None)
    return forms(ctx) if forms is not None else cls.FORMS  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------


class Stem(nn.Module):
    """Input to the hidden width; ``tokens``: the model takes ``(ids, x)`` and embeds the integer ids."""

    def __init__(self, form: str, ctx: Context, in_width: int) -> None:
        super().__init__()
        self.form = form
        if ctx.layout == "image":
            self.layer: nn.Module = nn.Conv2d(in_width, ctx.width, 3, padding=1, bias=ctx.bias)
        else:
            self.layer = nn.Linear(in_width, ctx.width, bias=ctx.bias)
        if form in ("embedding + x", "embedding * x"):
            self.embedding = nn.Embedding(5, ctx.width)

    def forward(self, *inputs: Tensor) -> Tensor:
        if self.form == "plain":
            return self.layer(inputs[0])
        ids, x = inputs
        if self.form == "embedding + x":
            return self.embedding(ids) + self.layer(x)
        if self.form == "x * mask(ids)":
            return self.layer(x) * (ids != 0).unsqueeze(-1).to(x.dtype)
        return self.layer(x) * torch.tanh(self.embedding(ids))


class Head(nn.Module):
    def __init__(self, form: str, ctx: Context, classes: int, spatial: int, widen: int) -> None:
        super().__init__()
        self.form = form
        width = ctx.width * widen
        if form == "identity":
            self.layer = None
        elif form in ("flatten", "Flatten"):
            flat = width * (ctx.length if ctx.layout == "sequence" else spatial * spatial)
            self.layer = nn.Linear(flat, classes, bias=ctx.bias)
        else:
            self.layer = nn.Linear(width, classes, bias=ctx.bias)
        if form == "AdaptiveAvgPool2d":
            self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, h: Tensor) -> Tensor:
        if self.form == "identity":
            return h
        if self.form in ("flatten", "Flatten"):
            h = h.flatten(1)
        elif self.form == "mean":
            h = h.mean(1) if h.dim() == 3 else h.mean((2, 3))
        elif self.form == "last":
            h = h[:, -1]
        elif self.form == "AdaptiveAvgPool2d":
            h = self.pool(h).flatten(1)
        elif self.form == "adaptive_avg_pool2d":
            h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.layer(h)


HEADS = {"vector": ("linear",), "sequence": ("mean", "flatten", "last"),
         "image": ("mean", "flatten", "AdaptiveAvgPool2d", "adaptive_avg_pool2d")}


class Net(nn.Module):
    """Stem, blocks, head."""

    def __init__(self, stem: Stem, blocks: Sequence[Block], head: Head) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head

    def forward(self, *inputs: Tensor) -> Tensor:
        h = self.stem(*inputs)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@dataclass
class Architecture:
    """A random model with its input, a ``grad_output`` and what it is made of."""

    model: Net
    x: Any  # a tensor, or (ids, x)
    grad_output: Tensor
    layout: str
    bias: bool
    stem: str
    head: str
    seed: int
    blocks: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    @property
    def pieces(self) -> set[str]:
        found = {name.split("/")[0] for name in self.blocks}
        if self.stem != "plain":
            found.add("tokens")
        return found

    @property
    def bias_free(self) -> bool:
        return not self.bias

    @property
    def conserves(self) -> bool:
        """Bias-free and built from pieces that conserve under the epsilon-0 composite."""
        return self.bias_free and self.stem == "plain" and all(block.conserves for block in self.model.blocks)

    @property
    def image_like(self) -> bool:
        return self.layout == "image"

    @property
    def has_batchnorm(self) -> bool:
        return any(block.has_batchnorm for block in self.model.blocks)

    @property
    def float_input(self) -> Tensor:
        return self.x[1] if isinstance(self.x, tuple) else self.x

    def folded(self) -> Net:
        """The model with every BatchNorm folded by hand."""
        twin = copy.deepcopy(self.model)
        twin.blocks = nn.ModuleList([block.folded() for block in twin.blocks]).to(D)
        return twin.eval()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints a falsifying example with this (the pieces, not the module tree)."""
        printer.text(repr(self))

    def __repr__(self) -> str:
        blocks = ", ".join(self.blocks)
        return (f"Architecture({self.layout}, bias={self.bias}, stem={self.stem}, [{blocks}], head={self.head}, "
                f"seed={self.seed})")


def build(chooser: Chooser, excluded: frozenset[str] = frozenset(), max_blocks: int = 3) -> Architecture:
    """One random architecture; pieces and forms in ``excluded`` (names as in :data:`KNOWN_DEFECTS`) are never chosen."""
    seed = chooser.integer(0, 2**31 - 1)
    torch.manual_seed(seed)
    layout = chooser.choice(("vector", "sequence", "image"))
    bias = chooser.choice((True, False))
    width = chooser.choice((2, 4)) if layout != "vector" else chooser.choice((2, 3, 4))
    length = chooser.integer(2, 3)
    ctx = Context(layout, width, bias, length)
    stems = ("plain",) if layout != "sequence" else ("plain", "embedding + x", "x * mask(ids)", "embedding * x")
    stems = tuple(s for s in stems if s == "plain" or not _excluded("tokens", s, excluded))
    stem_form = chooser.choice(stems)
    count = chooser.integer(1, max_blocks)
    blocks: list[Block] = []
    names: list[str] = []
    for _ in range(count):
        options = [
            (piece, form)
            for piece in LAYOUTS[layout]
            for form in _forms(PIECES[piece], ctx)
            if not _excluded(piece, form, excluded) and not (piece == "view" and width % 2 and form == "reshape_transpose")
        ]
        piece = chooser.choice(sorted({p for p, _ in options}, key=LAYOUTS[layout].index))
        form = chooser.choice([f for p, f in options if p == piece])
        blocks.append(PIECES[piece](form, ctx))
        names.append(f"{piece}/{form}")
    widen = 1
    if not _excluded("zero_output", ZeroOutput.FORMS[0], excluded) and chooser.integer(0, 5) == 0:
        blocks.append(ZeroOutput(ZeroOutput.FORMS[0], ctx))
        names.append(f"zero_output/{ZeroOutput.FORMS[0]}")
        widen = 2
    head_form = "identity" if widen == 2 and layout == "vector" else chooser.choice(HEADS[layout])
    batch = chooser.integer(1, 2)
    spatial = 3
    in_width = chooser.integer(1, 3)
    classes = chooser.integer(1, 3)
    stem = Stem(stem_form, ctx, in_width)
    model = Net(stem, blocks, Head(head_form, ctx, classes, spatial, widen)).to(D).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator, dtype=D) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator, dtype=D) - 0.5)
                module.running_mean.copy_(0.6 * torch.rand(module.running_mean.shape, generator=generator, dtype=D) - 0.3)
                module.running_var.copy_(1.5 * torch.rand(module.running_var.shape, generator=generator, dtype=D) + 0.5)
            elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator, dtype=D) / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator, dtype=D))
    if layout == "vector":
        x: Any = torch.randn(batch, in_width, generator=generator, dtype=D)
    elif layout == "sequence":
        x = torch.randn(batch, length, in_width, generator=generator, dtype=D)
    else:
        x = torch.randn(batch, in_width, spatial, spatial, generator=generator, dtype=D)
    if stem_form != "plain":
        x = (torch.randint(0, 5, (batch, length), generator=generator), x)
    with torch.no_grad():
        shape = copy.deepcopy(model)(*(x if isinstance(x, tuple) else (x,))).shape
    grad_output = torch.randn(shape, generator=generator, dtype=D)
    return Architecture(model, x, grad_output, layout, bias, stem_form, head_form, seed, names)


def default_excluded() -> frozenset[str]:
    return frozenset() if include_known_defects() else frozenset(KNOWN_DEFECTS)


@st.composite
def architectures(draw: Callable[[st.SearchStrategy[Any]], Any], include_known_defects: bool | None = None,
                  max_blocks: int = 3) -> Architecture:
    """Hypothesis strategy: a random :class:`Architecture` (without the pieces of :data:`KNOWN_DEFECTS` unless
    ``include_known_defects`` or ``LRPFUNC_PROPERTY_ALL=1``)."""
    if include_known_defects is None:
        excluded = default_excluded()
    else:
        excluded = frozenset() if include_known_defects else frozenset(KNOWN_DEFECTS)
    return build(DrawChooser(draw), excluded, max_blocks)


def sample(seed: int, excluded: frozenset[str] = frozenset(), max_blocks: int = 3) -> Architecture:
    """A random :class:`Architecture` from ``random.Random(seed)`` (surveys)."""
    return build(RandomChooser(seed), excluded, max_blocks)
