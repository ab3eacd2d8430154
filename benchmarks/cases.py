"""The measured things: one small context manager per (task, implementation).

Each ``impl(setup, variant, peers)`` is a context manager that prepares everything that is *not* to be
timed (its own deep copy of the model, registered hooks, a built attribution function) and yields a
zero-argument callable that does exactly one measured unit of work and returns its result. Leaving
the context undoes the preparation. An implementation that does not support a variant raises
:class:`Unsupported` (shown in the table with its reason) or :class:`NotApplicable` (shown as "-", or
as "n/a" with a footnote when it carries a reason).

Tasks (``TASKS``):

* ``first-order``: (output, relevance) for one batch and a one-hot ``grad_output``; variants are the
  composites ``gradient`` (no rules), ``epsilon`` (epsilon on every conv/linear layer), ``epsilon_plus``,
  ``epsilon_plus_flat`` and ``epsilon_gamma_box`` (low=-3, high=3); each configuration measures its own
  list of them (``benchmarks/configs.py``). Floor: ``torch.autograd.grad`` of the input.
* ``all-class``: relevance maps of K classes (variants 10, 100) for a single input. Floor:
  ``torch.func.vmap`` over the pullback of ``torch.func.vjp``.
* ``train-step``: gradient w.r.t. all parameters of a loss on the attribution (explanation-guided
  training). Floor: double backprop of the plain input gradient.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from benchmarks.configs import Config
from benchmarks.peers import Peers


class Unsupported(Exception):
    """The implementation cannot compute this variant (the message says why)."""


class NotApplicable(Exception):
    """The cell makes no sense for this implementation (e.g. a peer's 'no rules' composite); an optional
    message says why where that is not obvious."""


COMPOSITES = ("gradient", "epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box")
LOW, HIGH = -3.0, 3.0
FAMILIES = ("resnet", "vgg", "mobilenet", "mlp", "transformer")
#: The families whose compiled implementations run (``run.py --compile-all``: every family; inductor takes minutes
#: for a ResNet on two cores).
COMPILED_FAMILIES: tuple[str, ...] = ("mlp",)


@dataclasses.dataclass
class Setup:
    """One configuration with its data: the pristine model (never registered on) and its inputs."""

    config: Config
    model: nn.Module
    x: Tensor  # config.input_shape, standard normal clamped to [LOW, HIGH]
    targets: Tensor  # (batch,) class indices
    grad_output: Tensor  # (batch, num_classes) one-hot of targets
    mask: Tensor | None  # (1, 1, size, size): region whose relevance the training loss penalises (images only)
    share_model: bool = False  # fresh_model() hands out the model itself (checks that inspect it afterwards)

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def size(self) -> int | None:
        return self.config.size

    @property
    def batch(self) -> int:
        return self.config.batch

    @property
    def threads(self) -> int | None:
        return self.config.threads

    @property
    def family(self) -> str:
        """``resnet``, ``vgg``, ``mobilenet``, ``mlp`` or ``transformer``: decides the peers' canonizers."""
        for family in FAMILIES:
            if self.model_name.startswith(family):
                return family
        raise ValueError(f"Setup.family: model {self.model_name!r} belongs to none of {FAMILIES}")

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    @property
    def num_classes(self) -> int:
        return self.grad_output.shape[1]

    @property
    def label(self) -> str:
        return self.config.label

    def fresh_model(self) -> nn.Module:
        """A deep copy of the model (the model itself with ``share_model``)."""
        return self.model if self.share_model else copy.deepcopy(self.model)

    def single(self) -> Setup:
        """The same configuration with batch size 1 (for per-input tasks)."""
        return self.with_batch(1)

    def with_batch(self, batch: int) -> Setup:
        """The configuration with its first ``batch`` inputs (at most its own batch)."""
        if not 1 <= batch <= self.batch:
            raise ValueError(f"Setup.with_batch: batch must be within 1..{self.batch}, got {batch}")
        return dataclasses.replace(self, config=self.config.with_batch(batch), x=self.x[:batch],
                                   targets=self.targets[:batch], grad_output=self.grad_output[:batch])


def make_setup(config: Config, model: nn.Module, device: torch.device, seed: int = 0) -> Setup:
    """Inputs for ``config``: x standard normal clamped to [LOW, HIGH], one-hot targets ``(7 i + 3) % C``."""
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(config.input_shape, generator=gen, dtype=dtype).clamp_(LOW, HIGH)
    with torch.no_grad():
        num_classes = model(x[:1].to(device)).shape[1]
    targets = (torch.arange(config.batch) * 7 + 3) % num_classes
    grad_output = nn.functional.one_hot(targets, num_classes).to(dtype)
    mask = None
    if config.is_image:
        size = config.size
        mask = torch.ones(1, 1, size, size, dtype=dtype, device=device)
        mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0.0  # penalise relevance off-centre
    return Setup(config, model, x.to(device), targets.to(device), grad_output.to(device), mask)


def class_grad_outputs(setup: Setup, k: int) -> Tensor:
    """One-hot grad_outputs of the first ``k`` classes for a single input: (k, 1, num_classes)."""
    eye = torch.eye(setup.num_classes, device=setup.x.device, dtype=setup.x.dtype)
    return eye[:k, None, :]


def explanation_loss(relevance: Tensor, mask: Tensor) -> Tensor:
    """A 'right for the right reasons'-style loss: squared relevance outside the allowed region."""
    return (relevance.square() * mask).sum() / relevance.shape[0]


def detached_params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Composites and canonizers of each library, by variant name
# --------------------------------------------------------------------------------------------------

def lrpfunc_composite(lrpfunc: Any, name: str) -> Any:
    if name == "gradient":
        return None
    if name == "epsilon":
        # Zennit's layer map for the same name: layer_map_base (activations pass, residual sums and
        # average pools norm, BatchNorm pass) and epsilon on every convolution and dense layer.
        composites, rules, types = lrpfunc.composites, lrpfunc.rules, lrpfunc.types
        return composites.layer_map([*composites.layer_map_base(), (types.Linear, rules.epsilon())])
    if name == "epsilon_plus":
        return lrpfunc.composites.epsilon_plus()
    if name == "epsilon_plus_flat":
        return lrpfunc.composites.epsilon_plus_flat()
    if name == "epsilon_gamma_box":
        return lrpfunc.composites.epsilon_gamma_box(low=LOW, high=HIGH)
    raise ValueError(name)


def lrpfunc_canonizers(lrpfunc: Any, setup: Setup) -> tuple[Any, ...]:
    """The same canonizers as :func:`zennit_canonizers` (``resnet()`` includes the BatchNorm merge)."""
    if setup.family == "resnet":
        return (lrpfunc.canonizers.resnet(),)
    if setup.has_batchnorm:
        return (lrpfunc.canonizers.merge_batchnorm(),)
    return ()


def zennit_canonizers(zennit: Any, setup: Setup) -> list[Any]:
    """ResNet: ``ResNetCanonizer``; MobileNetV2: ``SequentialMergeBatchNorm`` (no Zennit canonizer
    handles its residual sum ``x + self.conv(x)``, which therefore keeps the plain gradient); other
    models with BatchNorm: ``VGGCanonizer`` (the same BatchNorm merge)."""
    if setup.family == "resnet":
        return [zennit.torchvision.ResNetCanonizer()]
    if setup.family == "mobilenet":
        return [zennit.canonizers.SequentialMergeBatchNorm()]
    if setup.has_batchnorm:
        return [zennit.torchvision.VGGCanonizer()]
    return []


def zennit_composite(zennit: Any, name: str, setup: Setup) -> Any:
    composites, rules, types = zennit.composites, zennit.rules, zennit.types
    if name == "gradient":
        raise NotApplicable
    if setup.family == "transformer":
        raise NotApplicable(ZENNIT_TRANSFORMER)
    canonizers = zennit_canonizers(zennit, setup)
    if name == "epsilon":
        # layer_map_base: Activation -> Pass, Sum (ResNet canonizer) -> Norm, AvgPool -> Norm,
        # BatchNorm -> Pass; then Epsilon on every Linear-type (convolutions and nn.Linear).
        return composites.LayerMapComposite(
            layer_map=composites.layer_map_base() + [(types.Linear, rules.Epsilon())],
            canonizers=canonizers,
        )
    if name == "epsilon_plus":
        return composites.EpsilonPlus(canonizers=canonizers)
    if name == "epsilon_plus_flat":
        return composites.EpsilonPlusFlat(canonizers=canonizers)
    if name == "epsilon_gamma_box":
        return composites.EpsilonGammaBox(low=LOW, high=HIGH, canonizers=canonizers)
    raise ValueError(name)


ZENNIT_TRANSFORMER = ("not measured: Zennit has no transformer composite (its layer_map_base gives "
                      "nn.MultiheadAttention the Pass rule of an activation)")
CAPTUM_NO_RULE = {
    "mobilenet": "captum LRP has no rule for ReLU6",
    "transformer": "captum LRP has no rule for the transformer's modules (MultiheadAttention's out_proj, LayerNorm)",
}


def _require(peers: Peers, name: str) -> Any:
    module = {"lrpfunc": peers.lrpfunc, "zennit": peers.zennit, "captum": peers.captum_attr}[name]
    if module is None:
        raise Unsupported(f"{name} not available: {peers.why.get(name, '?')}")
    return module


def _input_gradient(model: nn.Module, x: Tensor, grad_output: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
    x = x.detach().requires_grad_()
    output = model(x)
    (grad,) = torch.autograd.grad(output, x, grad_output, **kwargs)
    return output, grad


# --------------------------------------------------------------------------------------------------
# first-order
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def first_plain(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    model = setup.fresh_model()
    yield lambda: _input_gradient(model, setup.x, setup.grad_output)


def _attribution(setup: Setup, variant: str, peers: Peers) -> tuple[Any, nn.Module, Callable[..., Any]]:
    """lrpfunc, a fresh model and ``lrpfunc.attribute`` of it with the variant's composite and canonizers."""
    lrpfunc = _require(peers, "lrpfunc")
    model = setup.fresh_model()
    fn = lrpfunc.attribute(model, lrpfunc_composite(lrpfunc, variant), canonizers=lrpfunc_canonizers(lrpfunc, setup))
    return lrpfunc, model, fn


@contextlib.contextmanager
def first_lrpfunc(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    _, model, fn = _attribution(setup, variant, peers)
    params = detached_params(model)
    yield lambda: fn(params, setup.x, setup.grad_output)


@contextlib.contextmanager
def first_plain_compiled(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    """The plain input gradient through ``torch.compile(model)`` (inductor, default options): forward and backward
    compiled by AOTAutograd, as a compiled training step runs them. Compiled on the first call (its time is reported
    apart)."""
    if setup.family not in COMPILED_FAMILIES:
        raise NotApplicable(f"not compiled for {setup.family} (run.py --compile-all)")
    model = torch.compile(setup.fresh_model())
    yield lambda: _input_gradient(model, setup.x, setup.grad_output)


@contextlib.contextmanager
def first_lrpfunc_cached(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    """``lrpfunc.cached(attribute(...))``: traced once per signature, the graph replayed."""
    lrpfunc, model, fn = _attribution(setup, variant, peers)
    fast, params = lrpfunc.cached(fn), detached_params(model)
    yield lambda: fast(params, setup.x, setup.grad_output)


@contextlib.contextmanager
def first_lrpfunc_compiled(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    """``lrpfunc.compile(attribute(...))``: the traced graph compiled by inductor (default options) on the first
    call (its time is reported apart)."""
    if setup.family not in COMPILED_FAMILIES:
        raise NotApplicable(f"not compiled for {setup.family} (run.py --compile-all)")
    lrpfunc, model, fn = _attribution(setup, variant, peers)
    fast, params = lrpfunc.compile(fn), detached_params(model)
    yield lambda: fast(params, setup.x, setup.grad_output)


@contextlib.contextmanager
def first_zennit(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    zennit = _require(peers, "zennit")
    model = setup.fresh_model()
    composite = zennit_composite(zennit, variant, setup)
    # Hooks and canonizers are registered once, outside the timed region (Zennit's steady state).
    with composite.context(model) as modified:
        yield lambda: _input_gradient(modified, setup.x, setup.grad_output)


@contextlib.contextmanager
def first_zennit_attributor(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    """``zennit.attribution.Gradient(model, composite)(x, grad_output)``: Zennit's attributor, which
    registers the composite (canonizers and hooks) and removes it again on every call."""
    zennit = _require(peers, "zennit")
    model = setup.fresh_model()
    attributor = zennit.attribution.Gradient(model, zennit_composite(zennit, variant, setup))
    yield lambda: attributor(setup.x, setup.grad_output)


@contextlib.contextmanager
def first_captum(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    attr = _require(peers, "captum")
    if variant == "gradient":
        raise NotApplicable
    if variant == "epsilon_plus":
        raise Unsupported("captum LRP has no ZPlus rule")
    if variant == "epsilon_plus_flat":
        raise Unsupported("captum LRP has no Flat (or ZPlus) rule")
    if variant == "epsilon_gamma_box":
        raise Unsupported("captum LRP has no ZBox rule")
    if setup.family in CAPTUM_NO_RULE:
        raise Unsupported(CAPTUM_NO_RULE[setup.family])
    model = setup.fresh_model()
    # Captum's default rules: EpsilonRule(1e-9) on Conv2d/Linear/BatchNorm2d/pooling, ReLU/Dropout passed.
    lrp = attr.LRP(model)
    targets = setup.targets.tolist()
    yield lambda: lrp.attribute(setup.x.detach().requires_grad_(), target=targets)


# --------------------------------------------------------------------------------------------------
# all-class maps for one input
# --------------------------------------------------------------------------------------------------

ALL_CLASS_COMPOSITE = "epsilon_plus_flat"


@contextlib.contextmanager
def allclass_plain(setup: Setup, k: int, peers: Peers) -> Iterator[Callable[[], Any]]:
    setup = setup.single()
    model = setup.fresh_model()
    params = detached_params(model)
    grad_outputs = class_grad_outputs(setup, k)

    def call() -> tuple[Tensor, Tensor]:
        output, pullback = torch.func.vjp(lambda x: functional_call(model, params, (x,)), setup.x)
        (maps,) = torch.func.vmap(pullback)(grad_outputs)
        return output, maps

    yield call


@contextlib.contextmanager
def allclass_lrpfunc(setup: Setup, k: int, peers: Peers) -> Iterator[Callable[[], Any]]:
    lrpfunc = _require(peers, "lrpfunc")
    setup = setup.single()
    model = setup.fresh_model()
    fn = lrpfunc.attribute(model, lrpfunc_composite(lrpfunc, ALL_CLASS_COMPOSITE),
                           canonizers=lrpfunc_canonizers(lrpfunc, setup))
    params = detached_params(model)
    grad_outputs = class_grad_outputs(setup, k)
    batched = torch.func.vmap(fn, in_dims=(None, None, 0))
    yield lambda: batched(params, setup.x, grad_outputs)


@contextlib.contextmanager
def allclass_zennit_loop(setup: Setup, k: int, peers: Peers) -> Iterator[Callable[[], Any]]:
    """One forward pass, then k backward passes through the hooked graph (retain_graph=True)."""
    zennit = _require(peers, "zennit")
    setup = setup.single()
    model = setup.fresh_model()
    grad_outputs = class_grad_outputs(setup, k)
    composite = zennit_composite(zennit, ALL_CLASS_COMPOSITE, setup)

    def call() -> tuple[Tensor, Tensor]:
        x = setup.x.detach().requires_grad_()
        output = model(x)
        maps = [torch.autograd.grad(output, x, g, retain_graph=True)[0] for g in grad_outputs]
        return output, torch.stack(maps)

    with composite.context(model):
        yield call


@contextlib.contextmanager
def allclass_zennit_batch(setup: Setup, k: int, peers: Peers) -> Iterator[Callable[[], Any]]:
    """The input repeated k times along the batch, one forward and one backward pass."""
    zennit = _require(peers, "zennit")
    setup = setup.single()
    model = setup.fresh_model()
    grad_outputs = class_grad_outputs(setup, k)[:, 0]
    x_k = setup.x.expand(k, *setup.x.shape[1:]).contiguous()
    composite = zennit_composite(zennit, ALL_CLASS_COMPOSITE, setup)
    with composite.context(model):
        yield lambda: _input_gradient(model, x_k, grad_outputs)


# --------------------------------------------------------------------------------------------------
# explanation-guided training step
# --------------------------------------------------------------------------------------------------

TRAIN_COMPOSITE = "epsilon_plus_flat"


@contextlib.contextmanager
def train_plain(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    model = setup.fresh_model()
    params = list(model.parameters())

    def call() -> tuple[Tensor, ...]:
        _, grad = _input_gradient(model, setup.x, setup.grad_output, create_graph=True)
        return torch.autograd.grad(explanation_loss(grad, setup.mask), params, allow_unused=True)

    yield call


def _lrpfunc_step(setup: Setup, variant: str, peers: Peers) -> tuple[Any, nn.Module, Callable[..., Any]]:
    """lrpfunc, a fresh model and the training step ``(params, x, grad_output) -> d loss / d params`` on it."""
    lrpfunc, model, fn = _attribution(setup, variant, peers)

    def step(p: dict[str, Tensor], x: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
        return torch.func.grad(lambda q: explanation_loss(fn(q, x, grad_output)[1], setup.mask))(p)

    return lrpfunc, model, step


@contextlib.contextmanager
def train_lrpfunc(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    """The training step eagerly: ``torch.func.grad`` of the loss, the attribution traced on every call."""
    _, model, step = _lrpfunc_step(setup, variant, peers)
    params = detached_params(model)
    yield lambda: step(params, setup.x, setup.grad_output)


@contextlib.contextmanager
def train_lrpfunc_cached(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    """The training step traced once (``lrpfunc.cached(step, model=model)``) and its graph replayed."""
    lrpfunc, model, step = _lrpfunc_step(setup, variant, peers)
    fast, params = lrpfunc.cached(step, model=model), detached_params(model)
    yield lambda: fast(params, setup.x, setup.grad_output)


@contextlib.contextmanager
def train_lrpfunc_compiled(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    """The training step's graph compiled by inductor (``lrpfunc.compile(step, model=model)``)."""
    if setup.family not in COMPILED_FAMILIES:
        raise NotApplicable(f"not compiled for {setup.family} (run.py --compile-all)")
    lrpfunc, model, step = _lrpfunc_step(setup, variant, peers)
    fast, params = lrpfunc.compile(step, model=model), detached_params(model)
    yield lambda: fast(params, setup.x, setup.grad_output)


@contextlib.contextmanager
def train_zennit(setup: Setup, variant: str, peers: Peers) -> Iterator[Callable[[], Any]]:
    """Zennit's documented second-order recipe: create_graph=True, then the hooks made inactive.

    The value is wrong for this purpose: rules and canonizers read ``param.data``, so the parameter
    gradient does not see the rules' use of the parameters, and the merged BatchNorm is not differentiated.
    """
    zennit = _require(peers, "zennit")
    model = setup.fresh_model()
    params = list(model.parameters())
    composite = zennit_composite(zennit, variant, setup)

    def call() -> tuple[Tensor | None, ...]:
        _, relevance = _input_gradient(model, setup.x, setup.grad_output, create_graph=True)
        loss = explanation_loss(relevance, setup.mask)
        with composite.inactive():
            return torch.autograd.grad(loss, params, allow_unused=True)

    with composite.context(model):
        yield call


# --------------------------------------------------------------------------------------------------
# known wrong values (the timing is still shown, marked with this note)
# --------------------------------------------------------------------------------------------------

def value_note(task: str, impl: str, setup: Setup) -> str | None:
    """Why an implementation's *value* is known to be wrong for this task and model, or None."""
    if impl == "captum" and setup.family == "resnet":
        return ("captum value wrong on ResNet (|R| ~1e12, relevance not conserved): the residual sum is "
                "torchvision's in-place `out += identity`, which Captum's LRP does not see; with its "
                "Addition_Module in the block's forward it agrees with Zennit's epsilon (checked)")
    if task == "train-step" and impl.startswith("zennit"):
        return ("zennit value wrong: rules and canonizers read param.data, so the parameter gradient "
                "misses every path through the rules' modified parameters and the BatchNorm merge")
    return None


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

Impl = Callable[[Setup, Any, Peers], ContextManager[Callable[[], Any]]]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    title: str
    floor: str  # the implementation every ratio is relative to
    impls: dict[str, Impl]
    variants: tuple[Any, ...]
    per_input: bool = False  # measured once per (model, size) with batch 1
    note: str = ""
    peer: str | None = None  # the implementation lrpfunc's time is also divided by ("lrpfunc/<peer>")


TASKS: dict[str, Task] = {
    "first-order": Task(
        "first-order",
        "first-order attribution (output, relevance) of a batch",
        floor="plain",
        impls={"plain": first_plain, "plain-compiled": first_plain_compiled, "lrpfunc": first_lrpfunc,
               "lrpfunc-cached": first_lrpfunc_cached, "lrpfunc-compiled": first_lrpfunc_compiled,
               "zennit": first_zennit, "zennit-attributor": first_zennit_attributor, "captum": first_captum},
        variants=COMPOSITES,
        note="plain = torch.autograd.grad of the input; plain-compiled = the same through torch.compile(model); "
             "'gradient' = lrpfunc with composite=None (its tracing overhead); lrpfunc-cached = lrpfunc.cached "
             "(traced once, replayed); lrpfunc-compiled = lrpfunc.compile (inductor; compile time in the first-call "
             "column of the JSON and the progress lines); zennit = hooks registered once outside the timed region; "
             "zennit-attributor = zennit.attribution.Gradient, which registers and removes the composite "
             "on every call; captum re-attaches its rules and restores the state_dict on every call",
        peer="zennit",
    ),
    "all-class": Task(
        "all-class",
        f"all-class maps for one input ({ALL_CLASS_COMPOSITE})",
        floor="plain",
        impls={"plain": allclass_plain, "lrpfunc": allclass_lrpfunc, "zennit-loop": allclass_zennit_loop,
               "zennit-batch": allclass_zennit_batch},
        variants=(10, 100),
        per_input=True,
        note="plain = vmap over torch.func.vjp's pullback; lrpfunc = vmap over grad_output; zennit-loop = "
             "one forward, K backward passes (retain_graph); zennit-batch = input repeated K times",
        peer="zennit-loop",
    ),
    "train-step": Task(
        "train-step",
        f"explanation-guided training step: d loss(relevance) / d params ({TRAIN_COMPOSITE})",
        floor="plain",
        impls={"plain": train_plain, "lrpfunc": train_lrpfunc, "lrpfunc-cached": train_lrpfunc_cached,
               "lrpfunc-compiled": train_lrpfunc_compiled, "zennit": train_zennit},
        variants=(TRAIN_COMPOSITE,),
        note="plain = double backprop of the input gradient; lrpfunc = torch.func.grad of the loss; "
             "lrpfunc-cached / -compiled = that step traced as one graph (lrpfunc.cached/compile(step, model=)), "
             "replayed / compiled by inductor (torch.compile has no double backward for the plain step); "
             "zennit = its create_graph=True recipe, second pass with composite.inactive()",
        peer="zennit",
    ),
}
