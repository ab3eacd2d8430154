"""Composites: which rule goes to which call site.

A composite is a value with ``resolve(sites) -> rules``: given every call site of a forward pass in
execution order (:class:`lrpfunc.CallSite`), it returns one rule or ``None`` per site. Build your own
with the combinators :func:`layer_map`, :func:`name_map`, :func:`first_layer_map` and :func:`mixed`;
the named composites reproduce Zennit 0.5.1's layer maps. :func:`lrpfunc.rule_table` prints what a
composite resolves to for a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import rules as _rules
from . import types as _types
from ._composite import CallSite, Composite, Entries, Matcher
from ._stabilize import StabilizerLike
from ._sweep import Rule

__all__ = [
    "Composite",
    "layer_map",
    "name_map",
    "first_layer_map",
    "mixed",
    "layer_map_base",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "guided_backprop",
    "excitation_backprop",
    "deconvnet",
    "beta_smooth",
]

ZeroParams = str | Sequence[str] | None


def _flatten_matchers(matchers: object) -> list[Matcher]:
    """Nested tuples and lists of types (``(types.Linear, torch.nn.ReLU)``) flattened to one tuple."""
    if isinstance(matchers, (tuple, list)):
        return [leaf for item in matchers for leaf in _flatten_matchers(item)]
    return [matchers]  # type: ignore[list-item]


def _entries(where: str, entries: Entries) -> tuple[tuple[tuple[Matcher, ...], Rule], ...]:
    checked = []
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"{where}: each entry must be a pair (types, rule), got {entry!r}")
        matchers, rule = entry
        matchers = tuple(_flatten_matchers(matchers))
        if not matchers:
            raise TypeError(f"{where}: entry with rule {rule!r} matches no type")
        if not callable(rule):
            raise TypeError(f"{where}: the rule of entry {matchers!r} must be callable, got {type(rule).__name__}")
        checked.append((matchers, rule))
    return tuple(checked)


@dataclass(frozen=True)
class LayerMap:
    """Rule of the first entry whose types the site matches (module class, operation label or function)."""

    entries: tuple[tuple[tuple[Matcher, ...], Rule], ...]

    def rule_for(self, site: CallSite) -> Rule | None:
        return next((rule for matchers, rule in self.entries if site.matches(matchers)), None)

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        return [self.rule_for(site) for site in sites]


@dataclass(frozen=True)
class NameMap:
    """Rule of the first entry that lists the site's qualified name."""

    entries: tuple[tuple[tuple[str, ...], Rule], ...]

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        return [next((rule for names, rule in self.entries if site.name in names), None) for site in sites]


@dataclass(frozen=True)
class FirstLayerMap:
    """``first`` for the first site in execution order that it matches; ``rest`` for every other site."""

    first: LayerMap
    rest: Composite

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        resolved = list(self.rest.resolve(sites))
        for index, site in enumerate(sites):
            rule = self.first.rule_for(site)
            if rule is not None:
                resolved[index] = rule
                break
        return resolved


@dataclass(frozen=True)
class Mixed:
    """The first composite that assigns a site a rule wins."""

    composites: tuple[Composite, ...]

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        resolved: list[Rule | None] = [None] * len(sites)
        for composite in self.composites:
            for index, rule in enumerate(composite.resolve(sites)):
                if resolved[index] is None:
                    resolved[index] = rule
        return resolved


def layer_map(entries: Entries) -> LayerMap:
    """Map types to rules: ``layer_map([((torch.nn.Conv2d, torch.nn.Linear), rules.epsilon()), ...])``.

    A type matches module calls by ``isinstance``, operations by the label a canonizer gave them
    (:class:`lrpfunc.types.Sum`), and a torch function (``torch.add``) matches operations calling it. The
    first matching entry wins.
    """
    return LayerMap(_entries("layer_map", entries))


def name_map(entries: Sequence[tuple[str | Sequence[str], Rule]]) -> NameMap:
    """Map qualified names to rules: ``name_map([(("features.0", "features.2"), rules.zplus())])``."""
    checked = []
    for names, rule in _entries("name_map", entries):  # type: ignore[arg-type]
        flat = tuple(n for group in names for n in ((group,) if isinstance(group, str) else group))
        checked.append((flat, rule))
    return NameMap(tuple(checked))


def first_layer_map(first_map: Entries, layer_map: Entries | Composite) -> FirstLayerMap:
    """``first_map`` for the first call site in execution order that it matches, ``layer_map`` elsewhere.

    "First" is the first in the recorded execution order, not in ``named_modules()`` order.
    """
    rest = layer_map if isinstance(layer_map, Composite) else LayerMap(_entries("first_layer_map", layer_map))
    return FirstLayerMap(LayerMap(_entries("first_layer_map", first_map)), rest)


def mixed(composites: Sequence[Composite]) -> Mixed:
    """Combine composites: for each site, the first one that gives a rule wins."""
    composites = tuple(composites)
    for composite in composites:
        if not isinstance(composite, Composite):
            raise TypeError(f"mixed: expected composites, got {type(composite).__name__}")
    return Mixed(composites)


def layer_map_base(stabilizer: StabilizerLike = 1e-6) -> list[tuple[tuple[Matcher, ...], Rule]]:
    """The entries every LRP composite shares (Zennit's ``layer_map_base``): activations pass, sums and
    average pools norm, BatchNorm (when not merged by a canonizer) pass."""
    return [
        (_types.Activation, _rules.passthrough()),
        ((_types.Sum,), _rules.norm(stabilizer)),
        (_types.AvgPool, _rules.norm(stabilizer)),
        (_types.BatchNorm, _rules.passthrough()),
    ]


def _lrp(
    layer_entries: Entries | None,
    first_entries: Entries | None,
    body: list[tuple[tuple[Matcher, ...], Rule]],
    first: list[tuple[tuple[Matcher, ...], Rule]] | None,
    stabilizer: StabilizerLike,
) -> Composite:
    rest = LayerMap(_entries("composite", list(layer_entries or [])) + tuple(layer_map_base(stabilizer)) + tuple(body))
    if first is None:
        return rest
    return FirstLayerMap(LayerMap(_entries("composite", list(first_entries or [])) + tuple(first)), rest)


def epsilon_plus(
    *,
    epsilon: StabilizerLike = 1e-6,
    stabilizer: StabilizerLike = 1e-6,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
) -> Composite:
    """Convolutions z+, dense layers epsilon (Zennit's ``EpsilonPlus``). Entries in ``layer_map`` come first."""
    return _lrp(layer_map, None, [
        (_types.Convolution, _rules.zplus(stabilizer, zero_params)),
        (_types.Dense, _rules.epsilon(epsilon, zero_params)),
    ], None, stabilizer)


def epsilon_plus_flat(
    *,
    epsilon: StabilizerLike = 1e-6,
    stabilizer: StabilizerLike = 1e-6,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
    first_map: Entries | None = None,
) -> Composite:
    """:func:`epsilon_plus` with flat on the first dense or convolutional layer (Zennit's ``EpsilonPlusFlat``)."""
    return _lrp(layer_map, first_map, [
        (_types.Convolution, _rules.zplus(stabilizer, zero_params)),
        (_types.Dense, _rules.epsilon(epsilon, zero_params)),
    ], [(_types.Linear, _rules.flat(stabilizer, zero_params))], stabilizer)


def epsilon_alpha2_beta1(
    *,
    epsilon: StabilizerLike = 1e-6,
    stabilizer: StabilizerLike = 1e-6,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
) -> Composite:
    """Convolutions alpha=2 beta=1, dense layers epsilon (Zennit's ``EpsilonAlpha2Beta1``)."""
    return _lrp(layer_map, None, [
        (_types.Convolution, _rules.alpha_beta(2.0, 1.0, stabilizer, zero_params)),
        (_types.Dense, _rules.epsilon(epsilon, zero_params)),
    ], None, stabilizer)


def epsilon_alpha2_beta1_flat(
    *,
    epsilon: StabilizerLike = 1e-6,
    stabilizer: StabilizerLike = 1e-6,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
    first_map: Entries | None = None,
) -> Composite:
    """:func:`epsilon_alpha2_beta1` with flat on the first layer (Zennit's ``EpsilonAlpha2Beta1Flat``)."""
    return _lrp(layer_map, first_map, [
        (_types.Convolution, _rules.alpha_beta(2.0, 1.0, stabilizer, zero_params)),
        (_types.Dense, _rules.epsilon(epsilon, zero_params)),
    ], [(_types.Linear, _rules.flat(stabilizer, zero_params))], stabilizer)


def epsilon_gamma_box(
    low: float | Tensor,
    high: float | Tensor,
    *,
    epsilon: StabilizerLike = 1e-6,
    gamma: float = 0.25,
    stabilizer: StabilizerLike = 1e-6,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
    first_map: Entries | None = None,
) -> Composite:
    """ZBox on the first convolution, gamma on the other convolutions, epsilon on dense layers (Zennit's
    ``EpsilonGammaBox``)."""
    return _lrp(layer_map, first_map, [
        (_types.Convolution, _rules.gamma(gamma, stabilizer, zero_params)),
        (_types.Dense, _rules.epsilon(epsilon, zero_params)),
    ], [(_types.Convolution, _rules.zbox(low, high, stabilizer, zero_params))], stabilizer)


def guided_backprop(*, layer_map: Entries | None = None) -> Composite:
    """Guided Backpropagation on every ReLU (Zennit's ``GuidedBackprop``)."""
    return LayerMap(_entries("guided_backprop", list(layer_map or [])) + ((((torch.nn.ReLU,), _rules.relu_guided_backprop()),)))


def deconvnet(*, layer_map: Entries | None = None) -> Composite:
    """DeconvNet on every ReLU (Zennit's ``DeconvNet``)."""
    return LayerMap(_entries("deconvnet", list(layer_map or [])) + ((((torch.nn.ReLU,), _rules.relu_deconvnet()),)))


def beta_smooth(beta_smooth: float = 10.0, *, layer_map: Entries | None = None) -> Composite:
    """ReLU gradients replaced by softplus(beta_smooth) gradients (Zennit's ``BetaSmooth``)."""
    return LayerMap(
        _entries("beta_smooth", list(layer_map or [])) + ((((torch.nn.ReLU,), _rules.relu_beta_smooth(beta_smooth)),))
    )


def excitation_backprop(
    *, stabilizer: StabilizerLike = 1e-6, zero_params: ZeroParams = None, layer_map: Entries | None = None
) -> Composite:
    """Excitation Backprop: z+ on every dense and convolutional layer, norm on sums and average pools, plain
    gradient elsewhere (Zennit's ``ExcitationBackprop``).

    References:
        Zhang et al. (2016), Top-down neural attention by excitation backprop, ECCV.
    """
    return LayerMap(
        _entries("excitation_backprop", list(layer_map or []))
        + (
            ((_types.Sum,), _rules.norm(stabilizer)),
            (_types.AvgPool, _rules.norm(stabilizer)),
            (_types.Linear, _rules.zplus(stabilizer, zero_params)),
        )
    )
