"""Stabilised division: the denominator of every LRP rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

__all__ = ["stabilize", "Stabilizer", "StabilizerLike", "ensure_stabilizer", "is_zero", "divider", "ratio"]


def stabilize(
    z: Tensor,
    epsilon: float = 1e-6,
    *,
    clip: bool = False,
    norm_scale: bool = False,
    dim: Sequence[int] | None = None,
) -> Tensor:
    """Move ``z`` away from zero for a safe division.

    Definition:
        ``z + (sign(z) + (z == 0)) * epsilon``: zero counts as positive. With ``clip=True`` the magnitude
        is clipped instead, ``s * max(|z|, epsilon)`` with ``s = sign(z) + (z == 0)``. With
        ``norm_scale=True``, ``epsilon`` is first multiplied by the root mean square of ``z`` over ``dim``
        (all but the first dimension by default).

    Args:
        z: The denominator.
        epsilon: The shift (or the clipping bound).
        clip: Clip the magnitude instead of shifting it.
        norm_scale: Scale ``epsilon`` by the root mean square of ``z``.
        dim: Dimensions of the root mean square.

    Returns:
        A new tensor; its derivative w.r.t. ``z`` is exact (the sign factor is piecewise constant).

    Example:
        >>> stabilize(torch.tensor([-1.0, 0.0, 2.0]), 0.5)
        tensor([-1.5000,  0.5000,  2.5000])
    """
    if not (clip or norm_scale):
        # z + (sign(z) + (z == 0)) * epsilon, in z's precision, in three passes (z - e == z + (-e) exactly)
        shift = torch.where(
            z >= 0,
            torch.full((), epsilon, dtype=z.dtype, device=z.device),
            torch.full((), -epsilon, dtype=z.dtype, device=z.device),
        )
        return z + shift
    sign = (z == 0).to(z) + z.sign()
    if norm_scale:
        dims = tuple(range(1, z.ndim)) if dim is None else tuple(dim)
        epsilon = epsilon * (z**2).mean(dim=dims, keepdim=True) ** 0.5  # type: ignore[assignment]
    if clip:
        return sign * z.abs().clip(min=epsilon)
    return z + sign * epsilon


@dataclass(frozen=True)
class Stabilizer:
    """:func:`stabilize` with fixed options, as a value (Zennit's ``Stabilizer``)."""

    epsilon: float = 1e-6
    clip: bool = False
    norm_scale: bool = False
    dim: tuple[int, ...] | None = None

    def __call__(self, z: Tensor) -> Tensor:
        return stabilize(z, self.epsilon, clip=self.clip, norm_scale=self.norm_scale, dim=self.dim)


StabilizerLike = float | int | Callable[[Tensor], Tensor]


def ensure_stabilizer(value: StabilizerLike) -> Callable[[Tensor], Tensor]:
    """A float becomes :class:`Stabilizer` ``(epsilon=value)``; a callable is used as it is."""
    if isinstance(value, bool):
        raise TypeError(f"stabilizer: expected a float or a callable, got {value!r}")
    if isinstance(value, (float, int)):
        return Stabilizer(epsilon=float(value))
    if callable(value):
        return value
    raise TypeError(f"stabilizer: expected a float or a callable, got {type(value).__name__}")


def is_zero(value: StabilizerLike) -> bool:
    """Whether a stabilizer leaves every denominator as it is: ``0`` (a number) or a :class:`Stabilizer` with
    ``epsilon=0`` (clipping the magnitude at zero or scaling zero by a norm changes nothing either)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (float, int)):
        return value == 0
    return isinstance(value, Stabilizer) and value.epsilon == 0


def ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where the denominator is not zero, and ``0`` where it is.

    Definition:
        The division of an LRP rule without stabilizer (epsilon = 0): a unit whose output is exactly zero passes no
        relevance, instead of ``0 / 0``. Differentiable everywhere it is defined (no ``inf`` enters the derivative).
    """
    zero = denominator == 0
    return torch.where(zero, torch.zeros((), dtype=numerator.dtype, device=numerator.device),
                       numerator / torch.where(zero, torch.ones((), dtype=denominator.dtype, device=denominator.device),
                                               denominator))


def divider(value: StabilizerLike) -> Callable[[Tensor, Tensor], Tensor]:
    """``(R, z) -> R / s(z)`` for the stabilizer ``value``: :func:`ratio` when it is zero (see :func:`is_zero`)."""
    if is_zero(value):
        return ratio
    stabilizer = ensure_stabilizer(value)
    return lambda numerator, denominator: numerator / stabilizer(denominator)
