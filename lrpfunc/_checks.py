"""Checks of what the public transforms are given, each naming the argument, the module, the expected and the received,
and the warnings for what runs but is probably not meant: a model in training mode, and parameters that require grad
when nothing will differentiate the relevance."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import optree
import torch

from . import _functorch
from ._composite import Composite
from ._model import ModelInfo
from .canonizers import Canonizer

Tensor = torch.Tensor

__all__ = [
    "ParamsRequireGradWarning",
    "TrainingModeWarning",
    "check_grad_output",
    "check_params",
    "check_setup",
    "check_tensors",
    "mode_dependent",
    "warn_params_require_grad",
    "warn_training_mode",
]

#: How many names an error lists before it says how many more there are.
_LISTED = 5


class TrainingModeWarning(UserWarning):
    """The model is in training mode, and some of its modules compute differently there (active dropout, BatchNorm
    with the batch's statistics): two calls differ, and the relevance is not that of the network used for inference.
    Attributions are usually computed in eval mode (``model.eval()``); explanation-guided training may keep training
    mode on purpose, and can silence this with ``warnings.filterwarnings("ignore", category=TrainingModeWarning)``."""


class ParamsRequireGradWarning(UserWarning):
    """The parameters require grad, so the attribution records an exact tape through which the relevance can be
    differentiated w.r.t. them (``loss.backward()``), which costs about twice as much as a heatmap. A heatmap needs
    none: detached parameters (``{k: v.detach() for k, v in model.named_parameters()}``) or ``torch.no_grad()`` skip
    it; ``torch.func`` transforms need none either (they differentiate detached parameters)."""


def check_setup(where: str, model: Any, composite: Any, canonizers: Any) -> tuple[Canonizer, ...]:
    """The canonizers as a tuple, after checking the model, the composite and the canonizers' types."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    if composite is not None and not isinstance(composite, Composite):
        raise TypeError(
            f"{where}: composite must be None or a composite from lrpfunc.composites (an object with "
            f"resolve(sites)), got {type(composite).__name__}"
        )
    if isinstance(canonizers, Canonizer):
        canonizers = (canonizers,)
    canonizers = tuple(canonizers)
    for canonizer in canonizers:
        if not isinstance(canonizer, Canonizer):
            raise TypeError(
                f"{where}: canonizers must be lrpfunc.canonizers.Canonizer instances, got {type(canonizer).__name__}"
            )
    return canonizers


def _listed(items: list[str]) -> str:
    """The first items joined, and how many more there are."""
    return ", ".join(items[:_LISTED]) + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _prefix_hint(unknown: list[str], known: Collection[str]) -> str:
    """How the unknown names relate to the model's: a prefix the model's names have and these lack (a wrapper module
    such as :class:`lrpfunc.hf.FromEmbeddings` registers the wrapped model as ``model``), or one these have and the
    model's lack."""
    first = unknown[0]
    for name in sorted(known):
        if name.endswith("." + first):
            prefix = name[: -len(first)]
            if all(prefix + other in known for other in unknown):
                return (
                    f"; the model's names start with {prefix!r} (a wrapper module registers the wrapped model under "
                    f"that name): pass {{{prefix!r} + name: tensor}}"
                )
        if first.endswith("." + name):
            prefix = first[: -len(name)]
            if all(other.startswith(prefix) and other[len(prefix) :] in known for other in unknown):
                return f"; the model's names have no prefix {prefix!r}: drop it"
    return ""


def check_params(where: str, info: ModelInfo, model: torch.nn.Module, params: Any) -> None:
    """``params`` is a mapping of the model's parameter or buffer names to tensors of their shapes."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{where}: params must be a mapping of names to tensors like dict(model.named_parameters()), "
            f"got {type(params).__name__}"
        )
    unknown = [name for name in params if name not in info.known]
    if unknown:
        raise ValueError(
            f"{where}: params has names that are neither parameters nor buffers of "
            f"{type(model).__name__}: {_listed([repr(name) for name in unknown])}{_prefix_hint(unknown, info.known)}"
        )
    for name, value in params.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: params[{name!r}] must be a tensor, got {type(value).__name__}")
        own = info.by_name[name]
        lazy = torch.nn.parameter.UninitializedTensorMixin  # type: ignore[attr-defined]  # not in torch's stubs
        if value.shape != own.shape and not isinstance(own, lazy):
            module, _, _ = name.rpartition(".")
            owner = type(model.get_submodule(module)).__name__ if module else type(model).__name__
            raise ValueError(
                f"{where}: params[{name!r}] ({owner} {module or 'the model'!r}) must have the shape "
                f"{tuple(own.shape)} of the model's own tensor, got {tuple(value.shape)}"
            )


def check_tensors(where: str, what: str, tree: Any) -> None:
    """Every leaf of ``tree`` is a tensor; a model output with ``logits`` (a HuggingFace ``ModelOutput``) is told
    how to get them."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            location = what + "".join(f"[{key!r}]" for key in path)
            hint = ""
            if isinstance(getattr(leaf, "logits", None), Tensor):
                hint = (
                    "; it holds logits: attribute a module that returns them (lrpfunc.hf.FromEmbeddings does for a "
                    "HuggingFace model on inputs_embeds, or forward(x) = model(x).logits), or use "
                    "lrpfunc.hf.attribute_tokens on token ids"
                )
            raise TypeError(
                f"{where}: {location} must be a tensor (or a pytree of tensors), got {type(leaf).__name__}{hint}"
            )


def check_grad_output(where: str, output: Any, grad_output: Any) -> list[Tensor]:
    """The leaves of ``grad_output``, checked to have the structure, shapes and dtypes of the model's ``output``. A
    callable ``grad_output`` is called with the output first (:func:`lrpfunc.from_logit`)."""
    if callable(grad_output) and not isinstance(grad_output, Tensor):
        grad_output = grad_output(output)
    output_leaves, output_spec = optree.tree_flatten(output, none_is_leaf=True)
    grad_leaves, grad_spec = optree.tree_flatten(grad_output, none_is_leaf=True)
    if grad_spec != output_spec:
        raise ValueError(
            f"{where}: grad_output must have the structure of the model's output ({output_spec}), got {grad_spec}"
        )
    for index, (out, grad) in enumerate(zip(output_leaves, grad_leaves)):
        leaf = f" (output leaf {index})" if len(output_leaves) > 1 else ""
        if not isinstance(grad, Tensor) or grad.shape != out.shape:
            got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(f"{where}: grad_output{leaf} must have the output's shape {tuple(out.shape)}, got {got}")
        if out.is_floating_point() and grad.dtype != out.dtype:
            raise TypeError(
                f"{where}: grad_output{leaf} must have the output's dtype {out.dtype}, got {grad.dtype} "
                f"(convert it with .to(output.dtype), or the model with .to({grad.dtype}))"
            )
    return grad_leaves


def mode_dependent(model: torch.nn.Module, *, batchnorm: bool = True) -> list[tuple[str, torch.nn.Module]]:
    """The modules of ``model`` whose result depends on training mode: dropout with ``p > 0``, and (``batchnorm``)
    BatchNorm that keeps running statistics (it uses the batch's in training mode)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append((name, module))
        elif batchnorm and isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            found.append((name, module))
    return found


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of :func:`warnings.warn`, called by this module's caller, that points at the first frame
    outside the package: the user's call."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("lrpfunc"):
        frame = frame.f_back
        level += 1
    return level


def warn_training_mode(where: str, model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]]) -> bool:
    """Warn when a module of ``modules`` is in training mode; whether it warned."""
    training = [(name, module) for name, module in modules if module.training]
    if not training:
        return False
    listed = _listed([
        f"{type(module).__name__} {name!r} "
        + ("(active)" if isinstance(module, torch.nn.modules.dropout._DropoutNd) else "(the batch's statistics)")
        for name, module in training
    ])
    warnings.warn(
        f"{where}: {type(model).__name__} is in training mode, in which these modules compute differently: "
        f"{listed}; two calls differ, and the relevance is not that of the network used for inference. Call "
        f"model.eval() first; to keep training mode on purpose, silence this with "
        f"warnings.filterwarnings('ignore', category=lrpfunc.TrainingModeWarning)",
        TrainingModeWarning,
        stacklevel=_outside_stacklevel(),
    )
    return True


def warn_params_require_grad(where: str, params: Mapping[str, Tensor], others: list[Any], exact: bool) -> bool:
    """Warn when the exact tape was chosen only because parameters require grad; whether it warned."""
    if not exact or _functorch.transforms_active() or not torch.is_grad_enabled():
        return False
    if any(isinstance(t, Tensor) and t.requires_grad for t in others):
        return False
    if not any(t.requires_grad for t in params.values()):
        return False
    warnings.warn(
        f"{where}: params require grad, so the attribution records an exact tape for differentiating the relevance "
        f"w.r.t. them (about twice the time of a heatmap). For heatmaps pass detached params "
        f"({{k: v.detach() for k, v in model.named_parameters()}}) or call under torch.no_grad(); torch.func "
        f"transforms need no requires_grad either. To keep it (loss.backward() through the relevance), silence this "
        f"with warnings.filterwarnings('ignore', category=lrpfunc.ParamsRequireGradWarning)",
        ParamsRequireGradWarning,
        stacklevel=_outside_stacklevel(),
    )
    return True
