"""``run.py --check``: sanity checks of the models, the stand-in, the peers' set-ups and lrpfunc's agreement.

Each line is PASS, FAIL (counted; the exit status of ``--check-only``), SKIP (a peer is missing) or
INFO (a number worth seeing, or a known problem of a peer, not counted).

Agreement of relevances is checked in float64, where rounding does not hide a semantic difference,
on copies of the configurations with batch 2. For models with BatchNorm the strict comparison with
Zennit uses ``BatchNorm.eps = 0``: Zennit's ``MergeBatchNorm`` sets the running variance to 1 and leaves
the module in place, so its canonized model computes ``(1 + eps) ** -0.5`` times the merged value after
every BatchNorm (output off by ~5e-5 relative on ResNet-18 even in float64) while lrpfunc merges
exactly; with ``eps = 0`` both are exact and must agree to rounding. The float32 difference on the
benchmark's own model is printed as INFO.

The models with an input of their own (``mlp100``, ``mobilenet_v2``, ``transformer``) get
:func:`check_fixed`: lrpfunc without rules is the gradient, every implementation leaves the model as it
found it (Zennit's hooks removed), the transformer's rows take no fused kernel, lrpfunc against Zennit.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch

from benchmarks import cases, configs, models
from benchmarks.cases import Setup
from benchmarks.peers import Peers


class Checker:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, name: str, ok: bool | str | None, detail: str = "") -> None:
        """ok: True (PASS), False (FAIL, counted), None (SKIP), "info" (INFO, not counted)."""
        word = {True: "PASS", False: "FAIL", None: "SKIP", "info": "INFO"}[ok]
        self.failed += ok is False
        print(f"  {word}  {name}{': ' + detail if detail else ''}", flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _status(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:240]


def float64_setup(setup: Setup, *, batchnorm_eps: float | None = None) -> Setup:
    """The configuration in float64 with batch 2 (optionally with every BatchNorm's eps replaced)."""
    model = models.build(setup.model_name, dtype=torch.float64, device=setup.x.device)
    if batchnorm_eps is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eps = batchnorm_eps
    return cases.make_setup(setup.config.with_batch(min(setup.batch, 2)), model, setup.x.device)


def check_models(check: Checker, setups: list[Setup], peers: Peers) -> None:
    for name in sorted({s.model_name for s in setups}):
        a, b = models.build(name), models.build(name)
        same = all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
        check(f"{name}: build() is deterministic", same)
    if peers.zennit is not None:
        import torchvision.models.resnet as tv_resnet  # real or stand-in, whichever peers.load imported

        check("zennit sees benchmarks.models.BasicBlock as torchvision's",
              peers.zennit.torchvision.ResNetBasicBlock is models.BasicBlock,
              f"torchvision.models.resnet.BasicBlock is {tv_resnet.BasicBlock.__module__}.BasicBlock")


def _zennit_canonized_output(zennit: object, setup: Setup, model: torch.nn.Module, variant: str
                             ) -> tuple[torch.Tensor, int]:
    """The output of ``model`` with the variant's composite registered, and the number of Sum modules."""
    with cases.zennit_composite(zennit, variant, setup).context(model) as modified:
        with torch.no_grad():
            out = modified(setup.x)
        return out, sum(hasattr(m, "canonizer_sum") for m in modified.modules())


def check_zennit(check: Checker, setup: Setup, peers: Peers) -> None:
    zennit = peers.zennit
    model = setup.fresh_model()
    with torch.no_grad():
        reference = model(setup.x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = sum(isinstance(m, (models.BasicBlock, models.Bottleneck)) for m in model.modules())
    exact = float64_setup(setup, batchnorm_eps=0.0 if setup.has_batchnorm else None)
    exact_model = exact.fresh_model()
    with torch.no_grad():
        exact_reference = exact_model(exact.x)
    what = "float64" + (", BatchNorm eps=0" if setup.has_batchnorm else "")
    for variant in setup.config.composites[1:]:
        out, sums = _zennit_canonized_output(zennit, exact, exact_model, variant)
        err = rel_err(out, exact_reference)
        check(f"zennit {variant}: canonized output == plain output ({what})", err < 1e-10, f"rel. err {err:.1e}")
        if setup.family == "resnet":
            check(f"zennit {variant}: ResNet canonizer replaced every residual sum", sums == blocks,
                  f"{sums} Sum modules for {blocks} blocks")
    if setup.has_batchnorm:
        out, _ = _zennit_canonized_output(zennit, setup, model, setup.config.composites[1])
        check("zennit canonized output vs plain output (float32 benchmark model)", "info",
              f"rel. err {rel_err(out, reference):.1e} (Zennit's merged BatchNorm still divides by sqrt(1 + eps))")
    check("zennit: state restored bit for bit after the composites",
          all(torch.equal(v, state[k]) for k, v in model.state_dict().items()))

    # The all-class loop (one forward, K backward passes) gives the maps of K separate calls.
    single = setup.single()
    grad_outputs = cases.class_grad_outputs(single, 3)
    with cases.allclass_zennit_loop(single, 3, peers) as loop, cases.allclass_zennit_batch(single, 3, peers) as batch:
        maps_loop, maps_batch = loop()[1], batch()[1]
    composite = cases.zennit_composite(zennit, cases.ALL_CLASS_COMPOSITE, setup)
    with composite.context(model):
        separate = torch.stack([cases._input_gradient(model, single.x, g)[1] for g in grad_outputs])
    check("zennit all-class: one forward + K backward (retain_graph) == K calls", rel_err(maps_loop, separate) < 1e-5,
          f"rel. err {rel_err(maps_loop, separate):.1e}")
    err = rel_err(maps_batch[:, None], separate)
    check("zennit all-class: input repeated K times == K calls", err < 1e-4, f"rel. err {err:.1e}")


def check_captum(check: Checker, setup: Setup, peers: Peers) -> None:
    """Captum's epsilon LRP vs Zennit's, float64, with the same rules.

    Captum's defaults differ from the benchmark's ``epsilon`` composite in two ways, both aligned here:
    its epsilon is 1e-9 (set to Zennit's 1e-6), and MaxPool gets the epsilon rule, which drops the
    relevance that the gradient routes to a zero activation (Zennit's composite leaves MaxPool to the
    gradient; here it gets ``Epsilon`` as well). Captum starts from the target's output score, Zennit from
    grad_output (one-hot): Captum's relevance is divided by the score.
    """
    from captum.attr._utils.lrp_rules import EpsilonRule  # not re-exported by captum.attr

    zennit = peers.zennit
    note = cases.value_note("first-order", "captum", setup)
    s64 = float64_setup(setup)
    model = s64.fresh_model()
    rule_types = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.AdaptiveAvgPool2d, torch.nn.MaxPool2d)
    for m in model.modules():
        if isinstance(m, rule_types):
            m.rule = EpsilonRule(epsilon=1e-6)
    composite = zennit.composites.LayerMapComposite(
        layer_map=zennit.composites.layer_map_base() + [
            (zennit.types.Linear, zennit.rules.Epsilon()), (zennit.types.MaxPool, zennit.rules.Epsilon())],
        canonizers=cases.zennit_canonizers(zennit, s64),
    )
    try:
        captum_rel = peers.captum_attr.LRP(model).attribute(s64.x.detach().requires_grad_(),
                                                            target=s64.targets.tolist())
        zennit_model = s64.fresh_model()
        with composite.context(zennit_model):
            out, zennit_rel = cases._input_gradient(zennit_model, s64.x, s64.grad_output)
    except Exception as exc:
        check("captum epsilon runs", None, _status(exc))
        return
    score = out.detach().gather(1, s64.targets[:, None])[:, :, None, None]
    err = rel_err(captum_rel / score, zennit_rel)
    if not note and setup.has_batchnorm:
        note = "Captum applies its epsilon rule to BatchNorm itself, Zennit merges BatchNorm into the convolution"
    check("captum epsilon / score == zennit epsilon + MaxPool epsilon (float64)", "info" if note else err < 1e-8,
          f"rel. err {err:.1e}" + (f"; {note}" if note else ""))


def check_lrpfunc_gradient(check: Checker, setup: Setup, peers: Peers) -> None:
    """lrpfunc without a composite gives the output and ``torch.autograd.grad`` of the input (float32)."""
    reference_out, gradient = cases._input_gradient(setup.fresh_model(), setup.x, setup.grad_output)
    try:
        with cases.first_lrpfunc(setup, "gradient", peers) as call:
            out, grad = call()
        err = max(rel_err(grad, gradient), rel_err(out, reference_out))
        check("lrpfunc composite=None == torch.autograd.grad (float32)", err < 1e-5, f"rel. err {err:.1e}")
    except Exception as exc:
        check("lrpfunc composite=None runs", False, _status(exc))


def check_lrpfunc(check: Checker, setup: Setup, peers: Peers) -> None:
    check_lrpfunc_gradient(check, setup, peers)
    if peers.zennit is None:
        check("lrpfunc vs zennit", None, "zennit not available")
        return

    exact = float64_setup(setup, batchnorm_eps=0.0 if setup.has_batchnorm else None)
    what = "float64" + (", BatchNorm eps=0" if setup.has_batchnorm else "")
    for variant in setup.config.composites[1:]:
        try:
            with cases.first_lrpfunc(exact, variant, peers) as call:
                relevance = call()[1]
            with cases.first_zennit(exact, variant, peers) as call:
                zennit_relevance = call()[1]
            err = rel_err(relevance, zennit_relevance)
            check(f"lrpfunc {variant} == zennit {variant} ({what})", err < 1e-8, f"rel. err {err:.1e}")
            with cases.first_lrpfunc(setup, variant, peers) as call:
                relevance = call()[1]
            with cases.first_zennit(setup, variant, peers) as call:
                zennit_relevance = call()[1]
            check(f"lrpfunc {variant} vs zennit {variant} (float32 benchmark model)", "info",
                  f"rel. err {rel_err(relevance, zennit_relevance):.1e}")
        except Exception as exc:
            check(f"lrpfunc {variant} runs", False, _status(exc))
    try:
        single = exact.single()
        with cases.allclass_lrpfunc(single, 3, peers) as call:
            maps = call()[1]
        with cases.allclass_zennit_loop(single, 3, peers) as call:
            zennit_maps = call()[1]
        err = rel_err(maps, zennit_maps)
        check(f"lrpfunc vmap all-class == zennit loop ({what})", err < 1e-8, f"rel. err {err:.1e}")
    except Exception as exc:
        check("lrpfunc all-class runs", False, _status(exc))
    try:
        with cases.train_lrpfunc(setup, cases.TRAIN_COMPOSITE, peers) as call:
            grads = call()
        missing = [k for k, v in grads.items() if not torch.isfinite(v).all()]
        check("lrpfunc train-step gradient is finite for every parameter", not missing, ", ".join(missing[:5]))
    except Exception as exc:
        check("lrpfunc train-step runs", False, _status(exc))


def _directional(grads: dict[str, torch.Tensor | None], direction: dict[str, torch.Tensor]) -> float:
    return sum(float((g * direction[k]).sum()) for k, g in grads.items() if g is not None)


def check_train_step(check: Checker, setup: Setup, peers: Peers) -> None:
    """The training-step gradients against a central finite difference along a random direction (float64).

    lrpfunc must match (PASS/FAIL); Zennit's is compared with the finite difference of *its own* loss
    (re-registering the composite for every evaluation) and printed as INFO: its rules read ``param.data``.
    The step is tiny (h = 1e-8 on a direction with unit-variance entries): with 1e-5 .. 1e-6 the step
    already moves activations across ReLU, MaxPool and clamp kinks, and even the plain gradient's
    double backprop then disagrees with its finite difference; the tolerance (1e-2) covers the
    truncation error of the epsilon rule's large curvature (~7e-4 measured).
    """
    exact = float64_setup(setup, batchnorm_eps=0.0 if setup.has_batchnorm else None).single()
    model = exact.fresh_model()
    params = cases.detached_params(model)
    gen = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in params.items()}
    h, tolerance = 1e-8, 1e-2

    def central(loss_at: Any) -> float:
        return (float(loss_at(h)) - float(loss_at(-h))) / (2 * h)

    if peers.lrpfunc is not None:
        try:
            lrpfunc = peers.lrpfunc
            fn = lrpfunc.attribute(model, cases.lrpfunc_composite(lrpfunc, cases.TRAIN_COMPOSITE),
                                   canonizers=cases.lrpfunc_canonizers(lrpfunc, exact))
            with cases.train_lrpfunc(exact, cases.TRAIN_COMPOSITE, peers) as call:
                grads = call()
            fd = central(lambda t: cases.explanation_loss(
                fn({k: v + t * direction[k] for k, v in params.items()}, exact.x, exact.grad_output)[1], exact.mask))
            err = abs(_directional(grads, direction) - fd) / max(abs(fd), 1e-300)
            check("lrpfunc train-step gradient == central finite difference (float64)", err < tolerance,
                  f"rel. err {err:.1e}")
        except Exception as exc:
            check("lrpfunc train-step finite difference", False, _status(exc))

    if peers.zennit is not None:
        zennit_model = exact.fresh_model()
        composite = cases.zennit_composite(peers.zennit, cases.TRAIN_COMPOSITE, exact)

        def zennit_loss(t: float) -> torch.Tensor:
            with torch.no_grad():
                for k, p in zennit_model.named_parameters():
                    p.copy_(params[k] + t * direction[k])
            with composite.context(zennit_model):
                return cases.explanation_loss(
                    cases._input_gradient(zennit_model, exact.x, exact.grad_output)[1], exact.mask)

        fd = central(zennit_loss)
        zennit_loss(0.0)
        with cases.train_zennit(dataclasses.replace(exact, model=zennit_model), cases.TRAIN_COMPOSITE, peers) as call:
            grads = call()
        names = [k for k, _ in zennit_model.named_parameters()]
        err = abs(_directional(dict(zip(names, grads)), direction) - fd) / max(abs(fd), 1e-300)
        check("zennit train-step gradient vs central finite difference of its own loss (float64)", "info",
              f"rel. err {err:.1e} (known wrong: rules read param.data)")


# --------------------------------------------------------------------------------------------------
# the models with an input of their own (mlp100, mobilenet_v2, transformer)
# --------------------------------------------------------------------------------------------------

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
FUSED_KERNELS = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention")
# Families whose lrpfunc relevance must equal Zennit's (float64); elsewhere the difference is INFO.
EQUAL_TO_ZENNIT = frozenset({"mlp"})
DIFFERENT_FROM_ZENNIT = {
    "mobilenet": "no Zennit canonizer handles the residual sum x + self.conv(x) (Zennit gives it the plain "
                 "gradient), nor the functional adaptive_avg_pool2d",
}


def module_hooks(model: torch.nn.Module) -> int:
    """The number of forward, forward-pre, backward and backward-pre hooks on the modules of ``model``."""
    return sum(len(getattr(m, name)) for m in model.modules() for name in HOOK_DICTS)


@dataclasses.dataclass
class ModelState:
    """What an implementation must leave as it found: every module (name, type, training flag and
    attribute names, which show e.g. a left-over ``forward`` override), every parameter and buffer
    (copied), and which of them require grad."""

    modules: list[tuple[str, type, bool, tuple[str, ...]]]
    tensors: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelState:
        tensors = model.state_dict(keep_vars=True)
        return cls([(name, type(m), m.training, tuple(sorted(vars(m)))) for name, m in model.named_modules()],
                   {k: v.detach().clone() for k, v in tensors.items()},
                   {k: v.requires_grad for k, v in tensors.items()})

    def __eq__(self, other: object) -> bool:
        """Equal module lists and flags, bit-for-bit equal tensors."""
        return (isinstance(other, ModelState) and self.modules == other.modules
                and self.requires_grad == other.requires_grad and self.tensors.keys() == other.tensors.keys()
                and all(torch.equal(v, other.tensors[k]) for k, v in self.tensors.items()))


@contextlib.contextmanager
def count_fused_calls() -> Iterator[dict[str, int]]:
    """Count the calls of PyTorch's fused transformer kernels (:data:`FUSED_KERNELS`) inside the block.

    ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` look them up on the ``torch`` module
    when they take their fast path, so wrapping the module attributes sees every call.
    """
    counts = dict.fromkeys(FUSED_KERNELS, 0)
    originals = {name: getattr(torch, name) for name in FUSED_KERNELS}

    def counting(name: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return wrapper

    try:
        for name in FUSED_KERNELS:
            setattr(torch, name, counting(name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


def check_untouched(check: Checker, setup: Setup, impl: str, variant: str, peers: Peers) -> None:
    """Run ``impl`` (its own context manager, twice) on a model the check keeps, then compare the model
    with what it was: modules, state bit for bit, output, and hooks (Zennit's while registered: some;
    after: none; lrpfunc: none ever)."""
    factory = cases.TASKS["first-order"].impls[impl]
    model = setup.fresh_model()
    before = ModelState.of(model)
    with torch.no_grad():
        output_before = model(setup.x)
    shared = dataclasses.replace(setup, model=model, share_model=True)
    try:
        with factory(shared, variant, peers) as call:
            hooks_while = module_hooks(model)
            call()
            call()
    except (cases.NotApplicable, cases.Unsupported):
        return
    except Exception as exc:
        check(f"{impl} {variant} runs", False, _status(exc))
        return
    hooks_after = module_hooks(model)
    with torch.no_grad():
        output_after = model(setup.x)
    unchanged = before == ModelState.of(model) and torch.equal(output_before, output_after)
    check(f"{impl} {variant}: the model is unchanged afterwards (modules, state bit for bit, output)", unchanged)
    if impl == "zennit":
        check(f"zennit {variant}: hooks registered while active, all removed afterwards",
              hooks_while > 0 and hooks_after == 0, f"{hooks_while} while registered, {hooks_after} after")
    elif impl == "zennit-attributor":
        check(f"zennit-attributor {variant}: no hooks left after its calls", hooks_after == 0,
              f"{hooks_after} after")
    else:
        check(f"{impl} {variant}: no hooks on the model", hooks_while == hooks_after == 0,
              f"{hooks_while} while active, {hooks_after} after")


def check_fast_path(check: Checker, setup: Setup, peers: Peers) -> None:
    """No measured row of the transformer runs PyTorch's fused encoder-layer or attention kernel (it
    would skip the Python operations that lrpfunc records); a forward under ``no_grad`` does, which
    shows that the counting works."""
    model = setup.fresh_model()
    with count_fused_calls() as counts, torch.no_grad():
        model(setup.x)
    check("transformer: the fused kernels are counted (a no_grad forward takes them)", sum(counts.values()) > 0,
          ", ".join(f"{k} x{v}" for k, v in counts.items()))
    rows = [("plain", "gradient")] + [("lrpfunc", v) for v in setup.config.composites]
    for impl, variant in rows:
        try:
            with count_fused_calls() as counts, cases.TASKS["first-order"].impls[impl](setup, variant, peers) as call:
                call()
        except (cases.NotApplicable, cases.Unsupported):
            continue
        except Exception as exc:
            check(f"{impl} {variant} runs", False, _status(exc))
            continue
        check(f"transformer {impl} {variant}: no fused kernel (the Python operations run)",
              sum(counts.values()) == 0, ", ".join(f"{k} x{v}" for k, v in counts.items()))


def check_rule_sites(check: Checker, setup: Setup, peers: Peers, variant: str) -> None:
    """INFO: how many of lrpfunc's call sites the variant's composite gives a rule (``lrpfunc.rule_table``)."""
    lrpfunc = peers.lrpfunc
    try:
        table = lrpfunc.rule_table(setup.model, cases.lrpfunc_composite(lrpfunc, variant), setup.x,
                                   *cases.lrpfunc_canonizers(lrpfunc, setup))
        lines = table.format(header=False, legend=False).splitlines()
    except Exception as exc:
        check(f"lrpfunc rule_table {variant}", "info", _status(exc))
        return
    ruled = [line.split()[1].strip("'") for line in lines
             if line.rstrip() and not line.rstrip().endswith(" -") and "(covered by" not in line]
    check(f"lrpfunc {variant}: call sites with a rule", "info",
          f"{len(ruled)} of {len(lines)}: {', '.join(ruled[:8])}{' ...' if len(ruled) > 8 else ''}")


def check_against_zennit(check: Checker, setup: Setup, peers: Peers) -> None:
    """lrpfunc vs Zennit in float64 (BatchNorm eps = 0, see the module docstring): PASS/FAIL where the two
    must agree (:data:`EQUAL_TO_ZENNIT`), INFO where they differ by design (:data:`DIFFERENT_FROM_ZENNIT`)."""
    exact = float64_setup(setup, batchnorm_eps=0.0 if setup.has_batchnorm else None)
    what = "float64" + (", BatchNorm eps=0" if setup.has_batchnorm else "")
    for variant in setup.config.composites[1:]:
        try:
            with cases.first_zennit(exact, variant, peers) as call:
                zennit_relevance = call()[1]
        except (cases.NotApplicable, cases.Unsupported):
            continue
        try:
            with cases.first_lrpfunc(exact, variant, peers) as call:
                relevance = call()[1]
        except Exception as exc:
            check(f"lrpfunc {variant} runs", False, _status(exc))
            continue
        err = rel_err(relevance, zennit_relevance)
        if setup.family in EQUAL_TO_ZENNIT:
            check(f"lrpfunc {variant} == zennit {variant} ({what})", err < 1e-8, f"rel. err {err:.1e}")
        else:
            why = DIFFERENT_FROM_ZENNIT.get(setup.family, "")
            check(f"lrpfunc {variant} vs zennit {variant} ({what})", "info",
                  f"rel. err {err:.1e}" + (f"; {why}" if why else ""))


def check_fixed(check: Checker, setup: Setup, peers: Peers) -> None:
    """The checks of a model with an input of its own: lrpfunc without rules is the gradient; every
    implementation leaves the model as it found it (Zennit's hooks removed); the transformer's rows take
    no fused kernel; lrpfunc against Zennit."""
    if peers.lrpfunc is not None:
        check_lrpfunc_gradient(check, setup, peers)
    else:
        check("lrpfunc checks", None, f"lrpfunc: not available: {peers.why.get('lrpfunc', '')}")
    if setup.family == "transformer":
        check_fast_path(check, setup, peers)
    for variant in setup.config.composites:
        for impl in ("plain", "lrpfunc", "zennit", "zennit-attributor"):
            if (peers.lrpfunc is None and impl == "lrpfunc") or (peers.zennit is None and impl.startswith("zennit")):
                continue
            if impl == "plain" and variant != "gradient":
                continue
            check_untouched(check, setup, impl, variant, peers)
    if peers.lrpfunc is not None:
        for variant in setup.config.composites[1:]:
            check_rule_sites(check, setup, peers, variant)
    if peers.lrpfunc is not None and peers.zennit is not None:
        check_against_zennit(check, setup, peers)
    elif peers.zennit is None:
        check("zennit checks", None, peers.why.get("zennit", ""))


def run_checks(setups: list[Setup], peers: Peers) -> int:
    """Run every check; return the number of failures."""
    check = Checker()
    print("\n=== --check")
    check_models(check, setups, peers)
    seen: set[tuple[str, int | None]] = set()
    for setup in setups:
        if (setup.model_name, setup.size) in seen:  # the checks do not depend on the batch size
            continue
        seen.add((setup.model_name, setup.size))
        if setup.model_name in configs.FIXED:
            print(f"-- {setup.label}")
            check_fixed(check, setup, peers)
            continue
        print(f"-- {setup.model_name} {setup.size}px")
        if peers.zennit is not None:
            check_zennit(check, setup, peers)
        else:
            check("zennit checks", None, peers.why.get("zennit", ""))
        if peers.captum_attr is not None and peers.zennit is not None:
            check_captum(check, setup, peers)
        if peers.lrpfunc is not None:
            check_lrpfunc(check, setup, peers)
        else:
            check("lrpfunc checks", None, f"lrpfunc: not available: {peers.why.get('lrpfunc', '')}")
        check_train_step(check, setup, peers)
    print(f"--check: {check.failed} failed")
    return check.failed

