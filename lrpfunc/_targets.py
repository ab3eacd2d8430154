"""Where the attribution starts: :func:`from_logit`, the ``grad_output`` that seeds a target's logit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Tensor = torch.Tensor

__all__ = ["from_logit"]


def from_logit(target: int | Tensor, *, value: bool = True) -> Callable[[Tensor], Tensor]:
    """The ``grad_output`` that starts the attribution at the target logit, built from the model's output.

    Definition:
        For an output ``y`` with classes in its last dimension, the seed is ``y * onehot(target)`` (``value=True``)
        or ``onehot(target)`` (``value=False``). The relevance that reaches the input sums to the seed's sum where the
        rules conserve (:func:`lrpfunc.conservation` measures it), so:

        - ``value=True`` (the default; LXT's convention, Captum's ``LRP(model).attribute(x, target=...)`` and
          :func:`lrpfunc.hf.attribute_tokens`'): the relevance sums to the target logit, and positive relevance means
          "towards this logit's value"; a negative logit flips every sign. The seed is a differentiable function of
          the output, so derivatives of the relevance w.r.t. ``x`` or the parameters include the logit's own.
        - ``value=False`` (Zennit's ``grad_output``, and ``target=`` of Captum's gradient methods such as
          ``IntegratedGradients``): the relevance sums to 1 per sample; positive means "towards a larger logit".

        Relevance is linear in ``grad_output``, so the two differ by the factor ``y[target]`` per sample.

    Args:
        target: A class index for every row (an int), or an integer tensor that broadcasts against
            ``output.shape[:-1]`` (``(B,)`` for logits ``(B, C)``: one class per sample).

    Returns:
        A function ``output -> grad_output``; every attribution function accepts it as its ``grad_output`` and calls
        it with the model's output, so the forward pass runs once.

    Example:
        >>> fn = lrpfunc.attribute(model, lrpfunc.composites.epsilon_plus())
        >>> output, relevance = fn(params, x, lrpfunc.from_logit(3))              # class 3 for every sample
        >>> output, relevance = fn(params, x, lrpfunc.from_logit(labels, value=False))  # sums to 1 per sample
    """
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise TypeError(f"from_logit: target must be an int or an integer tensor, got {type(target).__name__}")
    if isinstance(target, Tensor) and (target.is_floating_point() or target.is_complex()):
        raise TypeError(f"from_logit: target must be an integer tensor, got dtype {target.dtype}")

    def seed(output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim < 1:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"from_logit: the model's output must be a tensor with classes in its last dimension, got {got}"
            )
        index = torch.as_tensor(target, device=output.device)
        try:
            index = index.expand(output.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"from_logit: target of shape {tuple(index.shape)} does not broadcast against the output's "
                f"{tuple(output.shape[:-1])} (its shape without the class dimension)"
            ) from None
        one_hot = torch.zeros_like(output).scatter(-1, index[..., None], 1.0)
        return one_hot * output if value else one_hot

    return seed
