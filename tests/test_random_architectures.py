"""Properties of every composite on random small architectures (tests/architectures.py), float64.

1. without a composite, ``attribute`` equals ``torch.func.vjp`` of the model (output and relevance);
2. with any composite and canonizer, the output equals the eager ``model(x)``;
3. the model's parameters and buffers are bitwise unchanged by every call, also by one that raised, and the model
   still deep-copies;
4. ``lrpfunc.conservation`` reports the relevance ``attribute`` returns;
5. bias-free models of conserving pieces conserve relevance under epsilon 0 (the sum rule on sums, passthrough on
   activations, the normalisation rule, the uniform rule on products);
6. ``merge_batchnorm`` gives the relevance of the model with its BatchNorms folded by hand;
7. z+ leaves out the terms it knows to be zero (the negative part of a ReLU's output) without changing the relevance
   or its gradient w.r.t. the input;
8. ``lrpfunc.cached`` gives the eager relevance (EpsilonPlus, with ``merge_batchnorm`` where the model has a
   BatchNorm, and AttnLRP), on its first call, on its replay, and after the parameters were written in place.

Examples per test: ``LRPFUNC_PROPERTY_EXAMPLES`` (default 40, derandomized, so CI is reproducible). The pieces of
``architectures.KNOWN_DEFECTS`` are left out unless ``LRPFUNC_PROPERTY_ALL=1``. A survey over many models, with
every piece, classifying the failures: ``python tests/test_random_architectures.py 2000``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optree
import torch
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from architectures import KNOWN_DEFECTS, Architecture, architectures, sample  # noqa: E402

import lrpfunc  # noqa: E402
from lrpfunc import canonizers, composites, ops, rules, types  # noqa: E402

with warnings.catch_warnings():
    # hypothesis' pytest plugin imports libcst to report a failing example, which warns on import
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover
        pass

EXAMPLES = int(os.environ.get("LRPFUNC_PROPERTY_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
Composite = Any


def epsilon_zero() -> Composite:
    """Epsilon 0 on every linear map (modules and functional), ``layer_map_base(0)`` elsewhere: the rules that
    conserve relevance on bias-free models."""
    return composites.layer_map(
        [(types.Linear + (ops.Dense, ops.Convolution), rules.epsilon(0.0))] + composites.layer_map_base(0.0)
    )


COMPOSITES: dict[str, Callable[[], Composite]] = {
    "none": lambda: None,
    "epsilon_plus": composites.epsilon_plus,
    "epsilon_plus_flat": composites.epsilon_plus_flat,
    "attnlrp": composites.attnlrp,
    "cp_lrp": composites.cp_lrp,
    "epsilon_zero": epsilon_zero,
}


def setups(arch: Architecture) -> Iterator[tuple[str, Composite, tuple[canonizers.Canonizer, ...]]]:
    """Every (composite, canonizers) that applies: epsilon_plus_flat on images only, merge_batchnorm where the model
    has a BatchNorm."""
    for name, make in COMPOSITES.items():
        if name == "epsilon_plus_flat" and not arch.image_like:
            continue
        yield name, make(), ()
        if arch.has_batchnorm and name != "none":
            yield f"{name}+merge_batchnorm", make(), (canonizers.merge_batchnorm(),)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


class StateChanged(AssertionError):
    """A call changed the model's parameters or buffers (or its input)."""


def _snapshot(arch: Architecture) -> tuple[dict[str, torch.Tensor], Any]:
    state = {name: value.detach().clone() for name, value in arch.model.state_dict().items()}
    return state, optree.tree_map(lambda leaf: leaf.clone(), arch.x)


def _check_unchanged(arch: Architecture, before: tuple[dict[str, torch.Tensor], Any], what: str) -> None:
    state, x = before
    now = arch.model.state_dict()
    if set(now) != set(state):
        raise StateChanged(f"{what}: the model's state keys changed: {sorted(set(now) ^ set(state))}")
    changed = [name for name, value in now.items() if not torch.equal(value, state[name])]
    if changed:
        raise StateChanged(f"{what}: changed the model's {changed}")
    if not all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(arch.x), optree.tree_leaves(x))):
        raise StateChanged(f"{what}: changed the input x")
    try:
        copy.deepcopy(arch.model)
    except Exception as error:  # noqa: BLE001
        raise StateChanged(f"{what}: the model no longer deep-copies: {type(error).__name__}: {error}") from error


def guarded(arch: Architecture, what: str, call: Callable[[], Any]) -> Any:
    """``call()``, then check that the model's state and the input are bitwise unchanged (also when it raised)."""
    before = _snapshot(arch)
    try:
        result = call()
    except Exception:
        _check_unchanged(arch, before, f"{what} (which raised)")
        raise
    _check_unchanged(arch, before, what)
    return result


def _inputs(x: Any) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def eager_output(arch: Architecture) -> torch.Tensor:
    """``model(x)`` on a copy of the model (a buffer updated in forward must not change the next call)."""
    with torch.no_grad():
        return copy.deepcopy(arch.model)(*_inputs(optree.tree_map(lambda t: t.clone(), arch.x)))


def attribute(arch: Architecture, name: str, composite: Composite, canonizer: tuple) -> tuple[torch.Tensor, Any]:
    fn = lrpfunc.attribute(arch.model, composite, canonizer)
    return guarded(arch, f"attribute({name})", lambda: fn(arch.params, arch.x, arch.grad_output))


def float_relevance(arch: Architecture, relevance: Any) -> torch.Tensor:
    """The relevance of the float input; the relevance of integer ids must be zeros of their shape."""
    if isinstance(arch.x, tuple):
        ids_relevance, relevance = relevance
        assert ids_relevance.shape == arch.x[0].shape and not ids_relevance.any(), "integer ids got relevance"
    return relevance


def _scale(*tensors: torch.Tensor) -> float:
    return max([1.0] + [float(t.detach().abs().sum()) for t in tensors])


# ---------------------------------------------------------------------------------------------------------------
# the properties (plain functions: the tests below and the survey call them)
# ---------------------------------------------------------------------------------------------------------------


def reference_gradient(arch: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and vector-Jacobian product of a copy of the model: ``torch.func.vjp``, or plain autograd where the
    model writes a buffer (``torch.func`` transforms refuse an in-place write to a captured tensor)."""
    model = copy.deepcopy(arch.model)
    ids = arch.x[0] if isinstance(arch.x, tuple) else None
    x = arch.float_input

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x) if ids is None else model(ids, x)

    if not any(block.startswith("buffer/") for block in arch.blocks):
        output, pullback = torch.func.vjp(forward, x)
        return output, pullback(arch.grad_output)[0]
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        output = forward(x)
        (gradient,) = torch.autograd.grad(output, x, arch.grad_output)
    return output.detach(), gradient


def check_no_composite_is_vjp(arch: Architecture) -> None:
    """Property 1."""
    output, relevance = attribute(arch, "none", None, ())
    expected_output, expected = reference_gradient(arch)
    torch.testing.assert_close(output, expected_output, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(float_relevance(arch, relevance), expected, rtol=1e-10, atol=1e-12 * _scale(expected))


def check_output_is_eager(arch: Architecture) -> None:
    """Properties 2 and 3: every composite and canonizer keeps the output, and the model's state."""
    expected = eager_output(arch)
    for name, composite, canonizer in setups(arch):
        output, relevance = attribute(arch, name, composite, canonizer)
        torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
        float_relevance(arch, relevance)


def check_state_unchanged_even_when_raising(arch: Architecture) -> None:
    """Property 3 alone: every call, including the ones that raise, leaves the model and the input unchanged."""
    for name, composite, canonizer in setups(arch):
        for fn in (lrpfunc.attribute(arch.model, composite, canonizer), lrpfunc.conservation(arch.model, composite, canonizer)):
            try:
                guarded(arch, name, lambda fn=fn: fn(arch.params, arch.x, arch.grad_output))
            except StateChanged:
                raise
            except Exception:  # noqa: BLE001  # other properties report the error itself
                pass


def check_conservation_report(arch: Architecture) -> None:
    """Property 4."""
    for name, composite, canonizer in setups(arch):
        _, relevance = attribute(arch, name, composite, canonizer)
        relevance = float_relevance(arch, relevance)
        fn = lrpfunc.conservation(arch.model, composite, canonizer)
        report = guarded(arch, f"conservation({name})", lambda fn=fn: fn(arch.params, arch.x, arch.grad_output))
        scale = _scale(relevance, arch.grad_output)
        assert math.isclose(report.total_in, float(arch.grad_output.sum()), rel_tol=1e-12, abs_tol=1e-12 * scale), (
            f"{name}: total_in {report.total_in} != sum(grad_output) {float(arch.grad_output.sum())}")
        assert math.isclose(report.total_out, float(relevance.detach().sum()), rel_tol=1e-9, abs_tol=1e-9 * scale), (
            f"{name}: conservation reports input relevance {report.total_out}, attribute {float(relevance.detach().sum())}")


def has_dead_unit(arch: Architecture) -> bool:
    """Whether some linear layer sees an input whose features are all exactly zero at a position (every ReLU before
    it off): its output is then exactly 0 without a bias, and no rule can pass on the relevance it receives."""
    model, dead = copy.deepcopy(arch.model), []

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        features = inputs[0].movedim(1, -1) if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) else inputs[0]
        dead.append(bool((features == 0).all(-1).any()))

    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        model(*_inputs(arch.x))
    return any(dead)


def check_epsilon_zero_conserves(arch: Architecture) -> None:
    """Property 5 (bias-free models of conserving pieces only, without units that are off for every input)."""
    if not arch.conserves or has_dead_unit(arch):
        return
    _, relevance = attribute(arch, "epsilon_zero", epsilon_zero(), ())
    relevance = float_relevance(arch, relevance)
    assert torch.isfinite(relevance).all(), "epsilon_zero: relevance not finite"
    total, seeded = float(relevance.detach().sum()), float(arch.grad_output.sum())
    assert math.isclose(total, seeded, rel_tol=1e-8, abs_tol=1e-8 * _scale(relevance, arch.grad_output)), (
        f"epsilon_zero: input relevance {total} != grad_output {seeded}")


def check_merge_batchnorm_is_folding(arch: Architecture) -> None:
    """Property 6 (models with a BatchNorm after a linear map)."""
    if not arch.has_batchnorm:
        return
    twin = arch.folded()
    twin_params = dict(twin.named_parameters())
    names = ("epsilon_plus", "attnlrp", "epsilon_zero") + (("epsilon_plus_flat",) if arch.image_like else ())
    for name in names:
        _, merged = attribute(arch, f"{name}+merge_batchnorm", COMPOSITES[name](), (canonizers.merge_batchnorm(),))
        _, expected = lrpfunc.attribute(twin, COMPOSITES[name]())(twin_params, arch.x, arch.grad_output)
        merged, expected = float_relevance(arch, merged), float_relevance(arch, expected)
        torch.testing.assert_close(merged, expected, rtol=1e-8, atol=1e-9 * _scale(expected),
                                   msg=lambda m, name=name: f"{name}+merge_batchnorm vs folded by hand: {m}")


def _zplus_everywhere(zero_terms: bool) -> Composite:
    """z+ on every linear map, ``layer_map_base`` elsewhere; with ``zero_terms=False`` every term is computed."""
    zplus = dataclasses.replace(rules.zplus(), zero_terms=zero_terms)
    return composites.layer_map([(types.Linear + (ops.Dense, ops.Convolution), zplus)] + composites.layer_map_base())


def check_known_zero_terms_change_nothing(arch: Architecture) -> None:
    """Property 7."""
    params = {name: value.detach() for name, value in arch.params.items()}
    fast, every = (lrpfunc.attribute(arch.model, _zplus_everywhere(zero_terms)) for zero_terms in (True, False))
    with torch.no_grad():
        got, expected = (float_relevance(arch, guarded(arch, "attribute(zplus)", lambda fn=fn: fn(
            params, arch.x, arch.grad_output))[1]) for fn in (fast, every))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * _scale(expected))

    def input_gradient(fn: Callable[..., Any]) -> torch.Tensor:
        x = arch.float_input.detach().clone().requires_grad_()
        with torch.enable_grad():
            relevance = float_relevance(arch, fn(params, (arch.x[0], x) if isinstance(arch.x, tuple) else x,
                                                 arch.grad_output)[1])
            weights = torch.linspace(-1.0, 1.0, relevance.numel(), dtype=relevance.dtype).view_as(relevance)
            (gradient,) = torch.autograd.grad((relevance * weights).sum(), x, allow_unused=True)
        return torch.zeros_like(x) if gradient is None else gradient

    got, expected = input_gradient(fast), input_gradient(every)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * _scale(expected))


def check_cached_equals_eager(arch: Architecture) -> None:
    """Property 8."""
    model = copy.deepcopy(arch.model)
    params = {name: value.detach() for name, value in model.named_parameters()}
    for name, composite, canonizer in setups(arch):
        if name not in ("epsilon_plus", "epsilon_plus+merge_batchnorm", "attnlrp"):
            continue
        fn = lrpfunc.attribute(model, composite, canonizer)
        fast = lrpfunc.cached(fn)
        for scale in (1.0, 1.0, -0.5):  # the first call traces, the second replays, the third after writes in place
            with torch.no_grad():
                for value in params.values():
                    value.mul_(scale)
                expected = float_relevance(arch, fn(params, arch.x, arch.grad_output)[1])
                got = float_relevance(arch, fast(params, arch.x, arch.grad_output)[1])
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * _scale(expected),
                                       msg=lambda m, name=name: f"{name} cached: {m}")


CHECKS: dict[str, Callable[[Architecture], None]] = {
    "1_vjp": check_no_composite_is_vjp,
    "2_output": check_output_is_eager,
    "3_state": check_state_unchanged_even_when_raising,
    "4_conservation_report": check_conservation_report,
    "5_epsilon_zero_conserves": check_epsilon_zero_conserves,
    "6_merge_batchnorm": check_merge_batchnorm_is_folding,
    "7_known_zero_terms": check_known_zero_terms_change_nothing,
    "8_cached": check_cached_equals_eager,
}


# ---------------------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(arch=architectures())
def test_no_composite_equals_vjp(arch: Architecture) -> None:
    check_no_composite_is_vjp(arch)


@SETTINGS
@given(arch=architectures())
def test_every_composite_keeps_the_eager_output_and_the_model(arch: Architecture) -> None:
    check_output_is_eager(arch)


@SETTINGS
@given(arch=architectures())
def test_model_state_is_unchanged_even_by_calls_that_raise(arch: Architecture) -> None:
    check_state_unchanged_even_when_raising(arch)


@SETTINGS
@given(arch=architectures())
def test_conservation_reports_the_attributed_relevance(arch: Architecture) -> None:
    check_conservation_report(arch)


@SETTINGS
@given(arch=architectures())
def test_bias_free_epsilon_zero_conserves(arch: Architecture) -> None:
    check_epsilon_zero_conserves(arch)


@SETTINGS
@given(arch=architectures())
def test_merge_batchnorm_equals_folding_by_hand(arch: Architecture) -> None:
    check_merge_batchnorm_is_folding(arch)


@SETTINGS
@given(arch=architectures())
def test_terms_known_to_be_zero_change_nothing(arch: Architecture) -> None:
    check_known_zero_terms_change_nothing(arch)


@SETTINGS
@given(arch=architectures())
def test_cached_equals_eager(arch: Architecture) -> None:
    check_cached_equals_eager(arch)


# ---------------------------------------------------------------------------------------------------------------
# the survey: python tests/test_random_architectures.py N [first_seed]
# ---------------------------------------------------------------------------------------------------------------


def _category(check: str, error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", message)[:110]
    return f"{check}: {type(error).__name__}: {message}"


def survey(count: int, first_seed: int = 0, excluded: frozenset[str] = frozenset()) -> None:
    """Check every property on ``count`` models (every piece but ``excluded``); print the failures by category."""
    torch.set_num_threads(1)
    failures: dict[str, list[Architecture]] = defaultdict(list)
    with_piece: Counter[str] = Counter()
    failing_models = 0
    for seed in range(first_seed, first_seed + count):
        arch = sample(seed, excluded)
        with_piece.update(arch.pieces)
        failed = False
        for check_name, check in CHECKS.items():
            try:
                check(arch)
            except Exception as error:  # noqa: BLE001
                failures[_category(check_name, error)].append(arch)
                failed = True
        failing_models += failed
    print(f"{count} models, {failing_models} with at least one failure")
    for category, archs in sorted(failures.items(), key=lambda item: -len(item[1])):
        pieces: Counter[str] = Counter()
        for arch in archs:
            pieces.update(arch.pieces)
        lift = sorted(((n / len(archs), p) for p, n in pieces.items()), reverse=True)[:4]
        smallest = min(archs, key=lambda a: (len(a.blocks), a.seed))
        print(f"\n[{len(archs)}] {category}")
        print("   pieces in the failing models: " + ", ".join(f"{p} {share:.0%}" for share, p in lift))
        print(f"   smallest: {smallest!r}")


if __name__ == "__main__":
    # python tests/test_random_architectures.py [N [first_seed]] [--ci]: --ci leaves out the known defects
    arguments = [a for a in sys.argv[1:] if a != "--ci"]
    survey(int(arguments[0]) if arguments else 200, int(arguments[1]) if len(arguments) > 1 else 0,
           frozenset(KNOWN_DEFECTS) if "--ci" in sys.argv else frozenset())
