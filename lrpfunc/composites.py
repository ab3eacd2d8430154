"""Composites: which rule goes to which call site.

A composite is a value with ``resolve(sites) -> rules``: given every call site of a forward pass in
execution order (:class:`lrpfunc.CallSite`), it returns one rule or ``None`` per site. Build your own
with the combinators :func:`layer_map`, :func:`name_map`, :func:`first_layer_map` and :func:`mixed`;
the named composites reproduce Zennit 0.5.1's layer maps. :func:`lrpfunc.rule_table` prints what a
composite resolves to for a model.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from . import ops as _ops
from . import rules as _rules
from . import types as _types
from ._composite import CallSite, Composite, Entries, Matcher, resolver_of, sources_of
from ._stabilize import StabilizerLike

Rule = Any

__all__ = [
    "Composite",
    "layer_map",
    "name_map",
    "first_layer_map",
    "mixed",
    "layer_map_base",
    "epsilon",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "guided_backprop",
    "excitation_backprop",
    "deconvnet",
    "beta_smooth",
    "attnlrp",
    "cp_lrp",
    "recompute_layers",
    "with_sources",
]

ZeroParams = str | Sequence[str] | None
_MISSING = object()
#: What a decider returns for a site that no entry matches (a rule of ``None`` is a decision: no rule).
_UNDECIDED = object()
Decider = Callable[[CallSite], Any]


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
        if rule is not None and not callable(rule):
            raise TypeError(
                f"{where}: the rule of entry {matchers!r} must be callable, got {type(rule).__name__} (give a rule, "
                f"or None for no rule)"
            )
        checked.append((matchers, rule))
    return tuple(checked)


def _decider_of(composite: Any) -> Decider | None:
    """A fresh streaming decider of ``composite``: its rule for each site, ``None`` where an entry gives no rule, and
    ``_UNDECIDED`` where it has nothing to say (a composite without deciders: where it gives ``None``). ``None`` if
    the composite only resolves whole lists of sites."""
    make = getattr(composite, "_decider", None)
    if callable(make):
        return make()
    resolve = resolver_of(composite)
    if resolve is None:
        return None
    return lambda site: _undecided_if_none(resolve(site))


def _undecided_if_none(rule: Any) -> Any:
    return _UNDECIDED if rule is None else rule


def _decisions(composite: Any, sites: Sequence[CallSite]) -> list[Any]:
    """The decisions of ``composite`` (see :func:`_decider_of`) for a whole list of sites."""
    decide = _decider_of(composite)
    if decide is not None:
        return [decide(site) for site in sites]
    return [_undecided_if_none(rule) for rule in composite.resolve(sites)]


def _rule_of(decision: Any) -> Any:
    return None if decision is _UNDECIDED else decision


def _resolver_from(decide: Decider | None) -> Callable[[CallSite], Rule | None] | None:
    if decide is None:
        return None
    return lambda site: _rule_of(decide(site))


def _opting_out(decide: Decider) -> Decider:
    """``decide``, where a module call that it gives no rule by an entry (``None``) takes the sites inside that call
    with it: its submodules and operations get no rule either (the whole call keeps its true gradient)."""
    inside: list[str] = []

    def decider(site: CallSite) -> Any:
        name = site.name
        for outer in inside:
            if not outer or name == outer or name.startswith((outer + ".", outer + "/")):
                return None
        rule = decide(site)
        if rule is None and site.kind == "module":
            inside.append(name)
        return rule

    return decider


@dataclass(frozen=True)
class LayerMap:
    """Rule of the first entry whose types the site matches (module class, operation label or function); an entry
    whose rule is ``None`` gives the sites it matches no rule (their true gradient), and no later entry (or composite
    of :func:`mixed`) is asked.

    What a site matches depends only on its module (by identity), or for an operation on its function, label and
    class: the answer is cached per module and per operation signature.
    """

    entries: tuple[tuple[tuple[Matcher, ...], Rule], ...]
    _by_module: dict[int, tuple[weakref.ref[torch.nn.Module], Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _by_op: dict[tuple[Any, ...], Any] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __repr__(self) -> str:
        return _label_of(self) or f"layer_map([{_count(self.entries)}])"

    def _match(self, site: CallSite) -> Any:
        return next((rule for matchers, rule in self.entries if site.matches(matchers)), _UNDECIDED)

    def rule_for(self, site: CallSite) -> Rule | None:
        return _rule_of(self.decide(site))

    def decide(self, site: CallSite) -> Any:
        """The rule of the first matching entry (which may be ``None``), or ``_UNDECIDED`` if none matches."""
        module = site.module
        if module is not None:
            found = self._by_module.get(id(module))
            if found is None or found[0]() is not module:
                found = self._by_module[id(module)] = (weakref.ref(module), self._match(site))
            return found[1]
        key = (site.func, site.label, site.op_class)
        found = self._by_op.get(key, _MISSING)
        if found is _MISSING:
            found = self._by_op[key] = self._match(site)
        return found

    def resolver(self) -> Callable[[CallSite], Rule | None]:
        return _resolver_from(self._decider())  # type: ignore[return-value]

    def _decider(self) -> Decider:
        return _opting_out(self.decide)

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        return _resolve_with(self.resolver(), sites)


@dataclass(frozen=True)
class NameMap:
    """Rule of the first entry that lists the site's qualified name; an entry whose rule is ``None`` gives the sites
    it lists no rule (their true gradient), and no later entry (or composite of :func:`mixed`) is asked."""

    entries: tuple[tuple[tuple[str, ...], Rule], ...]

    def __repr__(self) -> str:
        return _label_of(self) or f"name_map([{_count(self.entries)}])"

    def rule_for(self, site: CallSite) -> Rule | None:
        return _rule_of(self.decide(site))

    def decide(self, site: CallSite) -> Any:
        """The rule of the first entry listing the site (which may be ``None``), or ``_UNDECIDED`` if none does."""
        return next((rule for names, rule in self.entries if site.name in names), _UNDECIDED)

    def resolver(self) -> Callable[[CallSite], Rule | None]:
        return _resolver_from(self._decider())  # type: ignore[return-value]

    def _decider(self) -> Decider:
        return _opting_out(self.decide)

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        return _resolve_with(self.resolver(), sites)


def _resolve_with(resolve: Callable[[CallSite], Rule | None], sites: Sequence[CallSite]) -> list[Rule | None]:
    return [resolve(site) for site in sites]


@dataclass(frozen=True)
class FirstLayerMap:
    """``first`` for the first site in execution order that it matches (an entry with rule ``None`` included: that
    site gets no rule); ``rest`` for every other site."""

    first: LayerMap
    rest: Composite

    def __repr__(self) -> str:
        return _label_of(self) or f"first_layer_map([{_count(self.first.entries)}], {self.rest!r})"

    def resolver(self) -> Callable[[CallSite], Rule | None] | None:
        return _resolver_from(self._decider())

    def _decider(self) -> Decider | None:
        rest = _decider_of(self.rest)
        if rest is None:
            return None
        first = self.first.decide
        found = False

        def decide(site: CallSite) -> Any:
            nonlocal found
            rule = rest(site)
            if not found:
                first_rule = first(site)
                if first_rule is not _UNDECIDED:
                    found = True
                    return first_rule
            return rule

        return _opting_out(decide)

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        streaming = self.resolver()
        if streaming is not None:
            return _resolve_with(streaming, sites)
        resolved = list(self.rest.resolve(sites))
        for index, site in enumerate(sites):
            rule = self.first.decide(site)
            if rule is not _UNDECIDED:
                resolved[index] = rule
                break
        return resolved


@dataclass(frozen=True)
class Mixed:
    """The first composite that assigns a site a rule (or, by an entry with rule ``None``, no rule) wins."""

    composites: tuple[Composite, ...]

    def __repr__(self) -> str:
        return _label_of(self) or f"mixed([{', '.join(repr(composite) for composite in self.composites)}])"

    @property
    def sources(self) -> tuple[type, ...]:
        """The sources of every part (:func:`with_sources`)."""
        return tuple(dict.fromkeys(kind for composite in self.composites for kind in sources_of(composite)))

    def resolver(self) -> Callable[[CallSite], Rule | None] | None:
        return _resolver_from(self._decider())

    def _decider(self) -> Decider | None:
        parts = [_decider_of(composite) for composite in self.composites]
        if any(part is None for part in parts):
            return None

        def decide(site: CallSite) -> Any:
            found = _UNDECIDED
            for part in parts:
                rule = part(site)  # type: ignore[misc]  # every part sees every site (a first-layer map counts them)
                if found is _UNDECIDED:
                    found = rule
            return found

        return decide

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        streaming = self.resolver()
        if streaming is not None:
            return _resolve_with(streaming, sites)
        resolved: list[Any] = [_UNDECIDED] * len(sites)
        for composite in self.composites:
            for index, rule in enumerate(_decisions(composite, sites)):
                if resolved[index] is _UNDECIDED:
                    resolved[index] = rule
        return [_rule_of(rule) for rule in resolved]


@dataclass(frozen=True)
class Sourced:
    """``composite``'s rules, with the outputs of the calls of the module types ``sources`` made inputs of the
    attribution (:func:`with_sources`)."""

    composite: Composite
    sources: tuple[type, ...]

    def __repr__(self) -> str:
        names = ", ".join(kind.__name__ for kind in self.sources)
        return _label_of(self) or f"with_sources({self.composite!r}, {names})"

    def resolver(self) -> Callable[[CallSite], Rule | None] | None:
        return resolver_of(self.composite)

    def _decider(self) -> Decider | None:
        return _decider_of(self.composite)

    def resolve(self, sites: Sequence[CallSite]) -> list[Rule | None]:
        return list(self.composite.resolve(sites))


def layer_map(entries: Entries) -> LayerMap:
    """Map types to rules: ``layer_map([((torch.nn.Conv2d, torch.nn.Linear), rules.epsilon()), ...])``.

    A type matches module calls by ``isinstance``, operations by the label a canonizer gave them
    (:class:`lrpfunc.types.Sum`), and a torch function (``torch.add``) matches operations calling it. The
    first matching entry wins. A rule of ``None`` opts out: the sites that entry matches get no rule (the true
    gradient), and neither a later entry nor a later composite of :func:`mixed` is asked; for a module, neither are
    the submodules and operations inside its call (the whole module keeps its true gradient), e.g.
    ``layer_map([(torch.nn.LayerNorm, None), (torch.nn.Linear, rules.epsilon())])``; the ``layer_map`` and
    ``first_map`` entries of the named composites accept ``None`` alike.
    """
    return LayerMap(_entries("layer_map", entries))


def name_map(entries: Sequence[tuple[str | Sequence[str], Rule]]) -> NameMap:
    """Map qualified names to rules: ``name_map([(("features.0", "features.2"), rules.zplus())])``.

    A rule of ``None`` opts out: the sites named get no rule (the true gradient), and neither a later entry nor a
    later composite of :func:`mixed` is asked; for a module, neither are the submodules and operations inside its
    call (the whole module keeps its true gradient), e.g. ``mixed([name_map([("classifier", None)]), epsilon_plus()])``.
    """
    checked = []
    # names are checked and flattened like matchers
    named = cast("tuple[tuple[tuple[str, ...], Rule], ...]", _entries("name_map", entries))  # type: ignore[arg-type]
    for names, rule in named:
        flat = tuple(n for group in names for n in ((group,) if isinstance(group, str) else group))
        checked.append((flat, rule))
    return NameMap(tuple(checked))


def first_layer_map(first_map: Entries, layer_map: Entries | Composite) -> FirstLayerMap:
    """``first_map`` for the first call site in execution order that it matches, ``layer_map`` elsewhere.

    "First" is the first in the recorded execution order, not in ``named_modules()`` order. An entry of
    ``first_map`` with rule ``None`` gives that first site no rule.
    """
    rest = layer_map if isinstance(layer_map, Composite) else LayerMap(_entries("first_layer_map", layer_map))
    return FirstLayerMap(LayerMap(_entries("first_layer_map", first_map)), rest)


def mixed(composites: Sequence[Composite]) -> Mixed:
    """Combine composites: for each site, the first one that gives a rule wins; an entry with rule ``None`` of a
    :func:`layer_map`, :func:`name_map` or :func:`first_layer_map` decides too (no rule, later composites are not
    asked)."""
    composites = tuple(composites)
    for composite in composites:
        if not isinstance(composite, Composite):
            raise TypeError(f"mixed: expected composites, got {type(composite).__name__}")
    return Mixed(composites)


def recompute_layers(composite: Composite, *layers: Matcher) -> Mixed:
    """``composite``, with each call of a module of the types ``layers`` attributed by running it again when the sweep
    reaches it (:func:`lrpfunc.rules.recompute`): the forward pass holds those calls' inputs and outputs only, and the
    sweep one call's record at a time. For repeated blocks (a transformer's layers) the peak memory falls to about one
    block's, for about one more forward pass of each block; the relevance is that of ``composite`` where its rules
    inside a block depend on classes and operations only (``attnlrp()``, ``cp_lrp()``, the LRP composites without
    name or first-layer maps inside the blocks).

    Example: ``recompute_layers(attnlrp(), LlamaDecoderLayer)``; :func:`lrpfunc.hf.recompute_layers` finds a
    HuggingFace model's layer types.
    """
    if not isinstance(composite, Composite):
        raise TypeError(f"recompute_layers: expected a composite, got {type(composite).__name__}")
    if not layers:
        raise TypeError("recompute_layers: give at least one module type whose calls are recomputed")
    return mixed([layer_map([(tuple(layers), _rules.recompute(composite))]), composite])


def with_sources(composite: Composite, *layers: type) -> Sourced:
    """``composite``, with the output of every call of a module of the types ``layers`` made an input of the
    attribution of its own: a *source* of relevance like the model's input.

    Definition:
        The tensors such a call returns enter the recorded forward pass as fresh inputs: the operations that read them
        are operations on activations (a product ``q * cos`` with a rotary table is then a product of two activations,
        which :func:`attnlrp` splits by the uniform rule), and the relevance arriving at them is not propagated into
        the call. :func:`lrpfunc.attribute_with_params` reports it under the module's name (``name[i]`` for the
        ``i``-th of several outputs; calls of the same module add up); :func:`lrpfunc.hf.attribute_tokens` adds it to
        ``positions``. This is how PA-LRP (Bakish et al. 2025) gives relevance to rotary position embeddings: their
        ``cos`` and ``sin`` tables become inputs, indexed by position, instead of constants whose share of each
        product goes to the other operand. The output of ``attribute`` is unchanged; only the relevance moves.

    Example:
        ``with_sources(attnlrp(), types.RotaryEmbedding)``, which ``attnlrp(rotary_positions=True)`` builds.

    References:
        Bakish, Zimerman, Chefer and Wolf (2025), Revisiting LRP: Positional Attribution as the Missing Ingredient for
        Transformer Explainability, NeurIPS.
    """
    if not isinstance(composite, Composite):
        raise TypeError(f"with_sources: expected a composite, got {type(composite).__name__}")
    if not layers:
        raise TypeError("with_sources: give at least one module type whose outputs become inputs")
    for kind in layers:
        if not isinstance(kind, type):
            raise TypeError(f"with_sources: sources must be module types, got {kind!r}")
    return Sourced(composite, tuple(dict.fromkeys((*sources_of(composite), *layers))))


def layer_map_base(stabilizer: StabilizerLike = 1e-6, *,
                   zero_params: ZeroParams = None) -> list[tuple[tuple[Matcher, ...], Rule]]:
    """The entries every LRP composite shares.

    Zennit's ``layer_map_base`` (activation modules pass, sums and average pools norm, BatchNorm pass when not
    merged by a canonizer), extended to operations by their class (:mod:`lrpfunc.ops`), so that functional
    activations, residual sums, products, normalisations and softmax written without modules get their LRP rule:

    - activations (modules and :class:`~lrpfunc.ops.Elementwise` operations): :func:`~lrpfunc.rules.passthrough`;
    - sums of activations (:class:`~lrpfunc.ops.Sum`, and the resnet canonizer's label): :func:`~lrpfunc.rules.norm`;
    - average pools (modules and operations) and resampling: :func:`~lrpfunc.rules.norm`;
    - BatchNorm not merged (modules and eval-mode ``batch_norm`` operations): :func:`~lrpfunc.rules.passthrough`;
    - products of activations: :func:`~lrpfunc.rules.uniform`;
    - divisions of activations (renormalised weights, a normalisation written out): :func:`~lrpfunc.rules.quotient`,
      the denominator held constant;
    - normalisation modules (LayerNorm, GroupNorm, RMSNorm, also hand-written ones found by duck typing) and
      operations: :func:`~lrpfunc.rules.normalization`;
    - softmax: :func:`~lrpfunc.rules.softmax`;
    - sums over dimensions, scaling and shifting by constants: :func:`~lrpfunc.rules.epsilon`;
    - fused attention: :func:`~lrpfunc.rules.attention` (decomposed into the operations above).
    """
    return [
        (_types.Activation, _rules.passthrough()),
        ((_types.Sum, _ops.Sum), _rules.norm(stabilizer)),
        (_types.AvgPool + (_ops.AvgPool, _ops.Resample), _rules.norm(stabilizer)),
        (_types.BatchNorm + _types.FrozenBatchNorm + (_ops.BatchNorm,), _rules.passthrough()),
        (_types.Normalization + (_ops.Normalization,), _rules.normalization(stabilizer, zero_params)),
        ((_ops.Elementwise,), _rules.passthrough()),
        ((_ops.Product,), _rules.uniform(stabilizer)),
        ((_ops.Quotient,), _rules.quotient(stabilizer)),
        ((_ops.Softmax,), _rules.softmax()),
        ((_ops.Reduction, _ops.Scale, _ops.Shift), _rules.epsilon(stabilizer, zero_params)),
        ((_ops.Attention,), _rules.attention()),
    ]


_DENSE = _types.Dense + (_ops.Dense,)
_CONVOLUTION = _types.Convolution + (_ops.Convolution,)
_LINEAR = _DENSE + _CONVOLUTION


def _lrp(
    layer_entries: Entries | None,
    first_entries: Entries | None,
    body: list[tuple[tuple[Matcher, ...], Rule]],
    first: list[tuple[tuple[Matcher, ...], Rule]] | None,
    stabilizer: StabilizerLike,
    zero_params: ZeroParams = None,
) -> Composite:
    rest = LayerMap(
        _entries("composite", list(layer_entries or []))
        + tuple(layer_map_base(stabilizer, zero_params=zero_params))
        + tuple(body)
    )
    if first is None and first_entries:
        first = []
    if first is None:
        return rest
    return FirstLayerMap(LayerMap(_entries("composite", list(first_entries or [])) + tuple(first)), rest)


def _label_of(composite: object) -> str | None:
    """How a named composite was built (``epsilon_plus(epsilon=1e-06, stabilizer=1e-06)``), if it is one."""
    return composite.__dict__.get("_label")


def _count(entries: Sequence[object]) -> str:
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"


def _argument(value: object) -> str:
    """A short text of a composite's argument: lists by their length, tensors by their shape, functions by name."""
    if isinstance(value, Tensor):
        return f"{value.item()!r}" if value.numel() == 1 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)) and not all(isinstance(item, str) for item in value):
        return f"[{_count(value)}]"
    if callable(value) and not hasattr(value, "__dataclass_fields__"):
        return getattr(value, "__name__", type(value).__name__)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _labelled(make: Callable[..., Composite]) -> Callable[..., Composite]:
    """``make`` whose composites print as the call that built them (their classes' reprs would list every entry),
    without the arguments left at ``None``."""
    signature = inspect.signature(make)

    @functools.wraps(make)
    def build(*args: Any, **kwargs: Any) -> Composite:
        composite = make(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        shown = ", ".join(f"{name}={_argument(value)}" for name, value in bound.arguments.items() if value is not None)
        object.__setattr__(composite, "_label", f"{make.__name__}({shown})")  # not a field: equality ignores it
        return composite

    return build


@_labelled
def epsilon(
    epsilon: StabilizerLike = 1e-6,
    *,
    stabilizer: StabilizerLike = 1e-6,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
    first_map: Entries | None = None,
) -> Composite:
    """Epsilon-LRP on every linear layer (Bach et al. 2015): the "epsilon everywhere" of the README's tables.

    Definition:
        Every call of the linear class, dense or convolutional, module or operation (``nn.Linear``, ``nn.Conv2d``,
        ``nn.ConvTranspose2d``, ``F.linear``, ``F.conv2d``, ``x @ w``, HuggingFace ``Conv1D``), gets
        :func:`~lrpfunc.rules.epsilon`: with ``z_j = sum_i x_i w_ji + b_j``,

        ``R_i = sum_j x_i w_ji R_j / (z_j + epsilon * sign(z_j))`` (``sign(0) = 1``).

        Every other call gets what all LRP composites share (:func:`layer_map_base`: activations pass, sums and
        average pools the sum rule, normalisations their rule, ...); what no entry matches (max pooling, data
        movement) keeps the true gradient. With ``epsilon=0`` on a ReLU network without biases this is the
        gradient times the input. Entries of ``layer_map`` come first; ``first_map`` entries go to the first site
        in execution order that they match. ``stabilizer`` is the one of the shared entries.

    Example:
        >>> import torch
        >>> from lrpfunc import composites
        >>> composites.epsilon(0.01)
        epsilon(epsilon=0.01, stabilizer=1e-06)

    References:
        Bach et al. (2015), On pixel-wise explanations for non-linear classifier decisions by layer-wise relevance
        propagation, PLoS ONE.
    """
    return _lrp(layer_map, first_map, [(_LINEAR, _rules.epsilon(epsilon, zero_params))], None, stabilizer, zero_params)


@_labelled
def epsilon_plus(
    *,
    epsilon: StabilizerLike = 1e-6,
    stabilizer: StabilizerLike = 1e-6,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
) -> Composite:
    """Convolutions z+, dense layers epsilon (Zennit's ``EpsilonPlus``). Entries in ``layer_map`` come first."""
    return _lrp(layer_map, None, [
        (_CONVOLUTION, _rules.zplus(stabilizer, zero_params)),
        (_DENSE, _rules.epsilon(epsilon, zero_params)),
    ], None, stabilizer, zero_params)


@_labelled
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
        (_CONVOLUTION, _rules.zplus(stabilizer, zero_params)),
        (_DENSE, _rules.epsilon(epsilon, zero_params)),
    ], [(_LINEAR, _rules.flat(stabilizer, zero_params))], stabilizer, zero_params)


@_labelled
def epsilon_alpha2_beta1(
    *,
    epsilon: StabilizerLike = 1e-6,
    stabilizer: StabilizerLike = 1e-6,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
) -> Composite:
    """Convolutions alpha=2 beta=1, dense layers epsilon (Zennit's ``EpsilonAlpha2Beta1``)."""
    return _lrp(layer_map, None, [
        (_CONVOLUTION, _rules.alpha_beta(2.0, 1.0, stabilizer, zero_params)),
        (_DENSE, _rules.epsilon(epsilon, zero_params)),
    ], None, stabilizer, zero_params)


@_labelled
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
        (_CONVOLUTION, _rules.alpha_beta(2.0, 1.0, stabilizer, zero_params)),
        (_DENSE, _rules.epsilon(epsilon, zero_params)),
    ], [(_LINEAR, _rules.flat(stabilizer, zero_params))], stabilizer, zero_params)


@_labelled
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
        (_CONVOLUTION, _rules.gamma(gamma, stabilizer, zero_params)),
        (_DENSE, _rules.epsilon(epsilon, zero_params)),
    ], [(_CONVOLUTION, _rules.zbox(low, high, stabilizer, zero_params))], stabilizer, zero_params)


@_labelled
def guided_backprop(*, layer_map: Entries | None = None) -> Composite:
    """Guided Backpropagation on every ReLU, module or function (Zennit's ``GuidedBackprop``)."""
    return LayerMap(
        _entries("guided_backprop", list(layer_map or [])) + ((_types.ReLU, _rules.relu_guided_backprop()),)
    )


@_labelled
def deconvnet(*, layer_map: Entries | None = None) -> Composite:
    """DeconvNet on every ReLU, module or function (Zennit's ``DeconvNet``)."""
    return LayerMap(_entries("deconvnet", list(layer_map or [])) + ((_types.ReLU, _rules.relu_deconvnet()),))


@_labelled
def beta_smooth(beta_smooth: float = 10.0, *, layer_map: Entries | None = None) -> Composite:
    """ReLU gradients replaced by softplus(beta_smooth) gradients, for ReLU modules and functions (Zennit's
    ``BetaSmooth``)."""
    return LayerMap(
        _entries("beta_smooth", list(layer_map or [])) + ((_types.ReLU, _rules.relu_beta_smooth(beta_smooth)),)
    )


@_labelled
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
            ((_types.Sum, _ops.Sum), _rules.norm(stabilizer)),
            (_types.AvgPool + (_ops.AvgPool,), _rules.norm(stabilizer)),
            (_LINEAR, _rules.zplus(stabilizer, zero_params)),
        )
    )


@_labelled
def attnlrp(
    *,
    epsilon: StabilizerLike = 0.0,
    stabilizer: StabilizerLike = 0.0,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
    first_map: Entries | None = None,
    rotary_positions: bool = False,
) -> Composite:
    """AttnLRP for transformers (Achtibat et al. 2024), on modules and operations alike.

    Definition:
        Epsilon on every linear layer (dense and convolutional, modules or functional, HuggingFace ``Conv1D``
        included); the identity on element-wise nonlinearities; the sum rule on residual additions; the uniform
        rule on products of activations (``q @ k^T``, ``A @ v``, gated MLPs); normalisation with its divisor held
        constant (LayerNorm, RMSNorm, also hand-written); the softmax rule ``R_in = x * (R - s * sum(R))``; fused
        attention (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) decomposed into these operations,
        so eager, sdpa and ``nn.MultiheadAttention`` attention give the same relevance. Entries of ``layer_map`` come
        first (e.g. ``[(types.Linear + (ops.Dense, ops.Convolution), rules.gamma(0.25))]``, LXT's default for vision
        transformers); ``first_map`` entries go to the first site in execution order that they match.

        ``epsilon`` (linear layers) and ``stabilizer`` (sums, products, normalisations, scaling) default to 0: no
        stabilizer, a unit whose output is exactly zero passes no relevance. This is AttnLRP as LXT computes it
        (modified gradient times input; equal to LXT 2.1 to float rounding), and it is fast: every rule then has a
        gradient form, and the sweep propagates gradients (see :func:`lrpfunc.attribute`), at about the cost of a
        gradient. A positive ``epsilon`` gives epsilon-LRP on the linear layers, at about twice the cost.

        ``rotary_positions=True``: PA-LRP's treatment of rotary position embeddings (Bakish et al. 2025). The
        ``(cos, sin)`` tables of every rotary embedding module (:data:`lrpfunc.types.RotaryEmbedding`) become inputs
        of the attribution (:func:`with_sources`), so each product ``q * cos`` and ``rotate_half(q) * sin`` splits its
        relevance evenly between the query (key) and the table, and the tables' relevance is that of the positions
        (:func:`lrpfunc.hf.attribute_tokens` reports it in ``positions``). Default: the tables are constants, and all
        the relevance of those products goes to the queries and keys (LXT's AttnLRP).

    References:
        Achtibat et al. (2024), AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers, ICML.

        Bakish, Zimerman, Chefer and Wolf (2025), Revisiting LRP: Positional Attribution as the Missing Ingredient for
        Transformer Explainability, NeurIPS.
    """
    composite = _lrp(layer_map, first_map, [(_LINEAR, _rules.epsilon(epsilon, zero_params))], None, stabilizer,
                     zero_params)
    return with_sources(composite, _types.RotaryEmbedding) if rotary_positions else composite


@_labelled
def cp_lrp(
    *,
    epsilon: StabilizerLike = 0.0,
    stabilizer: StabilizerLike = 0.0,
    zero_params: ZeroParams = None,
    layer_map: Entries | None = None,
    first_map: Entries | None = None,
) -> Composite:
    """CP-LRP for transformers (Ali et al. 2022): :func:`attnlrp` with attention weights and gates held constant.

    Definition:
        As :func:`attnlrp`, except that a product of activations gives all its relevance to the operands that are
        not a gate: an operand produced by a softmax (attention weights) or an element-wise nonlinearity (the
        activated gate of a gated MLP, a squeeze-excitation scale) receives none, so relevance flows through the
        values only (:func:`~lrpfunc.rules.gated`). ``epsilon`` and ``stabilizer`` as for :func:`attnlrp`. Queries
        and keys get no relevance, so neither do rotary position embeddings (there is no ``rotary_positions``).

    References:
        Ali et al. (2022), XAI for Transformers: Better Explanations through Conservative Propagation, ICML.
    """
    entries = list(layer_map or []) + [((_ops.Product,), _rules.gated(stabilizer))]
    return _lrp(entries, first_map, [(_LINEAR, _rules.epsilon(epsilon, zero_params))], None, stabilizer, zero_params)
