"""Layer relevance and concept-conditional relevance: :func:`attribute_layers`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch

from ._attribute import Setup, _run
from ._checks import check_setup
from ._composite import Composite
from ._inference import outside_inference_mode
from .canonizers import Canonizer

Tensor = torch.Tensor

__all__ = ["attribute_layers"]

LayerAttributionFn = Callable[..., tuple[Any, Any, dict[str, Any]]]
_CALL = re.compile(r"^(?P<name>.*)\[(?P<index>\d+)\]$")


class _Calls:
    """The observed calls of the requested layers in one evaluation, and their public names.

    During the trace each call of a requested module gets the internal key ``(name, call index)``; once the trace
    is complete (the sweep runs after it) a module called once is named ``name`` and one called ``n`` times
    ``name[0]`` ... ``name[n-1]``.
    """

    def __init__(self, layers: Mapping[str, str]) -> None:
        self.layers = layers  # canonical module name -> the name the user gave
        self.seen: dict[str, set[int]] = {}
        self.keys: dict[str, tuple[str, int]] = {}

    def observe(self, name: str, index: int) -> str | None:
        given = self.layers.get(name)
        if given is None:
            return None
        self.seen.setdefault(given, set()).add(index)
        key = f"{given}\x00{index}"
        self.keys[key] = (given, index)
        return key

    def public(self, key: str) -> str:
        given, index = self.keys[key]
        return given if len(self.seen[given]) == 1 else f"{given}[{index}]"

    def names(self) -> list[str]:
        """Every public name, in the order the calls were made."""
        return list(dict.fromkeys(self.public(key) for key in self.keys))


def _lookup(table: Mapping[str, Any], public: str) -> Any:
    """``table[public]``, or for the call ``name[k]`` of a module called several times ``table[name]``."""
    if public in table:
        return table[public]
    match = _CALL.match(public)
    if match is not None and match["name"] in table:
        return table[match["name"]]
    return None


def attribute_layers(
    model: torch.nn.Module,
    composite: Composite | None = None,
    layers: Sequence[str] = (),
    canonizers: Sequence[Canonizer] | Canonizer = (),
) -> LayerAttributionFn:
    """:func:`attribute`, plus the relevance at the outputs of chosen modules, optionally masked there.

    Definition:
        The sweep of :func:`attribute`. Where it reaches the output of a call of a module named in ``layers``, the
        relevance arriving there is recorded (``layer_relevance``), multiplied by that layer's mask if one is given,
        and propagated on. With masks this is concept-conditional relevance (CRP, Achtibat et al. 2023): a one-hot
        channel mask keeps the relevance of one channel (a concept), and the input relevance is that concept's
        share of the explanation. ``grad_output`` may instead give the relevance at layers (``{name: relevance}``):
        the sweep then starts there (concept-to-input maps), and nothing starts at the model's output.

        Masks and seeds are ordinary arguments: ``torch.func.vmap`` over them computes many conditions from one
        forward pass, and everything is differentiable like :func:`attribute`'s result.

    Args:
        model: Any ``torch.nn.Module``; never modified.
        composite: The rules (:mod:`lrpfunc.composites`); ``None`` for the plain gradient.
        layers: Qualified module names as in ``model.named_modules()`` (``"features.10"``, ``"model.layers.3.mlp"``).
        canonizers: As for :func:`attribute`.

    Returns:
        ``fn(params, x, grad_output, masks=None) -> (output, relevance, layer_relevance)``.
        ``layer_relevance[name]`` is the relevance arriving at that module's output, before its mask, with the
        output's shape (a tuple for a module with several tensor outputs). A module called several times gives
        ``name[0]``, ``name[1]``, ... in call order. ``masks`` maps a name (or ``name[k]`` for one call of such a
        module; ``name`` masks every call) to a tensor that broadcasts to the output (a tuple for several outputs);
        ``grad_output`` is shaped like the model's output, or a mapping ``{name: relevance}`` keyed the same way.

    Raises:
        TypeError, ValueError: A name that is not a module of the model, a module that was not called or lies
            inside a call one rule propagates as a whole, or a mask or seed of the wrong shape.

    References:
        Achtibat et al. (2023), From attribution maps to human-understandable explanations through Concept
        Relevance Propagation, Nature Machine Intelligence 5, 1006-1019.

    Example:
        >>> fn = attribute_layers(model, composites.epsilon_plus(), layers=["features.10"])
        >>> out, heatmap, at = fn(params, x, grad_output)
        >>> channels = at["features.10"].sum((2, 3)).topk(8).indices[0]
        >>> masks = torch.eye(at["features.10"].shape[1])[channels][:, None, :, None, None]
        >>> concept_maps = torch.func.vmap(lambda m: fn(params, x, grad_output, {"features.10": m})[1])(masks)
    """
    where = f"attribute_layers({type(model).__name__}, composite)"
    setup = Setup(where, model, composite, check_setup(where, model, composite, canonizers))
    if isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules(remove_duplicate=False))
    canonical: dict[str, str] = {}
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"{where}: layers must be module names (strings), got {type(name).__name__}")
        if name not in modules:
            close = [known for known in modules if known and (known.endswith(name) or name.endswith(known))][:5]
            hint = f"; similar: {', '.join(repr(c) for c in close)}" if close else ""
            raise ValueError(f"{where}: {type(model).__name__} has no module named {name!r}{hint}")
        owner = setup.info.names.get(id(modules[name]), name)
        if owner in canonical and canonical[owner] != name:
            raise ValueError(f"{where}: layers {canonical[owner]!r} and {name!r} are the same module")
        canonical[owner] = name
    if not canonical:
        raise ValueError(f"{where}: layers must name at least one module")

    @outside_inference_mode
    def attribution(
        params: Mapping[str, Tensor], x: Any, grad_output: Any, masks: Mapping[str, Any] | None = None
    ) -> tuple[Any, Any, dict[str, Any]]:
        calls = _Calls(canonical)
        masks = _check_table(where, "masks", masks if masks is not None else {}, canonical.values())
        seeds = _layer_seeds(grad_output, canonical.values())
        if seeds is not None:
            seeds = _check_table(where, "grad_output", seeds, canonical.values())
        recorded: dict[str, dict[int, Tensor]] = {}

        def observer(key: str, position: int, arriving: Tensor) -> Tensor:
            public = calls.public(key)
            if seeds is not None:
                seed = _entry(where, "grad_output", _lookup(seeds, public), public, position)
                if seed is not None:
                    if seed.shape != arriving.shape:
                        raise ValueError(
                            f"{where}: grad_output[{public!r}] must have the shape of that output, "
                            f"{tuple(arriving.shape)}, got {tuple(seed.shape)}"
                        )
                    arriving = arriving + seed
            recorded.setdefault(public, {})[position] = arriving
            mask = _entry(where, "masks", _lookup(masks, public), public, position)
            if mask is None:
                return arriving
            try:
                shape = torch.broadcast_shapes(mask.shape, arriving.shape)
            except RuntimeError:
                shape = None
            if shape != arriving.shape:
                raise ValueError(
                    f"{where}: masks[{public!r}] must broadcast to the output of {public!r}, "
                    f"{tuple(arriving.shape)}, got {tuple(mask.shape)}"
                )
            return arriving * mask

        leaves: list[Any] = optree.tree_leaves(
            (masks, seeds),  # type: ignore[arg-type]  # optree's PyTree is a class to a type checker
            none_is_leaf=True,
        )
        more = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        output, relevance = _run(
            setup,
            params,
            x,
            grad_output if seeds is None else None,
            None,
            observe=calls.observe,
            observer=observer,
            seed_output=seeds is None,
            more=more,
        )
        missing = [name for name in canonical.values() if name not in calls.seen]
        if missing:
            raise ValueError(
                f"{where}: {', '.join(repr(m) for m in missing)} made no call the sweep could observe: the module "
                f"was not called in this forward pass, or it lies inside a call that one rule propagates as a whole "
                f"(observe that call instead)"
            )
        layer_relevance: dict[str, Any] = {}
        for public in calls.names():
            found = recorded.get(public)
            if not found:
                raise ValueError(
                    f"{where}: the output of {public!r} does not depend on the input, so no relevance reaches it "
                    f"(a constant such as a position embedding: see lrpfunc.attribute_with_params)"
                )
            values = tuple(found[k] for k in sorted(found))
            for what, table in (("masks", masks), ("grad_output", seeds or {})):
                given = _lookup(table, public)
                if isinstance(given, (tuple, list)) and len(given) != len(values):
                    raise ValueError(
                        f"{where}: {what}[{public!r}] has {len(given)} entries, {public!r} has {len(values)} tensor "
                        f"outputs"
                    )
            layer_relevance[public] = values[0] if len(values) == 1 else values
        return output, relevance, layer_relevance

    return attribution


def _entry(where: str, what: str, value: Any, public: str, position: int) -> Tensor | None:
    """The mask or seed for output ``position`` of a call: a tensor for every output, or one entry of a tuple."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if position >= len(value):
            raise ValueError(f"{where}: {what}[{public!r}] has {len(value)} entries, too few for the module's outputs")
        value = value[position]
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{where}: {what}[{public!r}] must be a tensor (or a tuple of them), got {type(value).__name__}"
        )
    return value


def _names_layer(key: object, known: set[str]) -> bool:
    """Whether ``key`` is the name of a layer in ``known`` or of one of its calls (``"name[index]"``)."""
    if not isinstance(key, str):
        return False
    return key in known or ((match := _CALL.match(key)) is not None and match["name"] in known)


def _layer_seeds(grad_output: Any, names: Any) -> Mapping[str, Any] | None:
    """``grad_output`` as relevance at layers (a mapping whose keys are all layer names or calls), else ``None``."""
    if not isinstance(grad_output, Mapping) or not grad_output:
        return None
    known = set(names)
    keys = list(grad_output)
    hits = [k for k in keys if _names_layer(k, known)]
    if not hits:
        return None
    return grad_output


def _check_table(where: str, what: str, table: Any, names: Any) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise TypeError(f"{where}: {what} must be a mapping of layer names to tensors, got {type(table).__name__}")
    known = set(names)
    for key in table:
        match = _CALL.match(key) if isinstance(key, str) else None
        if not isinstance(key, str) or (key not in known and (match is None or match["name"] not in known)):
            raise ValueError(
                f"{where}: {what} has key {key!r}, which is not one of the layers {sorted(known)} (or name[k] for "
                f"one call of a module called several times)"
            )
    return dict(table)
