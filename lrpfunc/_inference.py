"""Attribution under ``torch.inference_mode()``.

Inference mode turns autograd off entirely (``torch.enable_grad()`` inside it records nothing), and the modified
backward pass is built from autograd's pullbacks: inside it, relevance would come out wrong (zeros for the plain
gradient). The attribution functions therefore leave it for their own work (:func:`outside_inference_mode`) and run
as under ``torch.no_grad()``; inference tensors among their arguments, which autograd cannot save for a backward pass,
are copied into ordinary ones first. What they return are ordinary tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import optree
import torch

__all__ = ["outside_inference_mode"]

F = TypeVar("F", bound=Callable[..., Any])


def _ordinary(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def outside_inference_mode(function: F) -> F:
    """``function`` run outside inference mode and under ``torch.no_grad()`` when called inside inference mode, with
    inference tensors among its arguments (at any depth of their pytrees) copied into ordinary tensors."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return function(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            arguments: Any = (args, kwargs)
            ordinary_args, ordinary_kwargs = optree.tree_map(_ordinary, arguments, none_is_leaf=True)
            return function(*ordinary_args, **ordinary_kwargs)

    return cast(F, wrapper)
