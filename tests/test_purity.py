"""The model is never touched: no state, flag, hook, attribute or submodule changes, after successful and
after failing calls, and concurrent calls from several threads do not interfere."""

from __future__ import annotations

import concurrent.futures
import copy
import threading

import pytest
import torch
from models import TinyResNet, cnn, randomize_batchnorms
from torch import nn
from torch.nn.modules import module as module_globals

import lrpfunc
from lrpfunc import canonizers, composites, rules, types

D = torch.float64

GLOBAL_HOOK_DICTS = [
    name
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
        "_global_forward_hooks_always_called",
        "_global_forward_hooks_with_kwargs",
    )
    if hasattr(module_globals, name)
]
MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet().to(D).eval()
    randomize_batchnorms(model)
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything about ``model`` that attribution must leave as it is."""
    return {
        "state": {name: value.detach().clone() for name, value in model.state_dict().items()},
        "state_objects": {name: id(value) for name, value in model.state_dict(keep_vars=True).items()},
        "versions": {name: value._version for name, value in model.state_dict(keep_vars=True).items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "modules": [(name, id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "children": {name: [id(c) for c in m.children()] for name, m in model.named_modules()},
        "hooks": {
            name: {attr: dict(getattr(m, attr, {})) for attr in MODULE_HOOK_DICTS}
            for name, m in model.named_modules()
        },
        "dict_keys": {name: sorted(m.__dict__) for name, m in model.named_modules()},
        "dict_values": {name: {k: id(v) for k, v in m.__dict__.items()} for name, m in model.named_modules()},
        "forward": {name: type(m).forward for name, m in model.named_modules()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), f"{name} changed"
    for key in before:
        if key != "state":
            assert after[key] == before[key], f"{key} changed"
    for name, m in model.named_modules():
        for attr in MODULE_HOOK_DICTS:
            assert not getattr(m, attr, {}), f"{name}.{attr} is not empty"
    assert_no_global_state()


def assert_no_global_state() -> None:
    for name in GLOBAL_HOOK_DICTS:
        assert len(getattr(module_globals, name)) == 0, f"torch.nn.modules.module.{name} is not empty"
    assert torch._C._len_torch_function_stack() == 0, "a torch function mode is still active"


def _raising_rule(call, grad_outputs):
    raise KeyError("this rule always fails")


@pytest.fixture
def model() -> nn.Module:
    model = _resnet()
    assert_no_global_state()
    return model


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, dtype=D, generator=generator), torch.randn(2, 5, dtype=D, generator=generator)


@pytest.mark.parametrize(
    "make_composite, canonizer_list",
    [
        (lambda: None, ()),
        (composites.epsilon_plus_flat, (canonizers.resnet(),)),
        (lambda: composites.epsilon_gamma_box(-3.0, 3.0), (canonizers.merge_batchnorm(),)),
        (composites.guided_backprop, (canonizers.softplus(),)),
    ],
    ids=["no-composite", "epsilon_plus_flat-resnet", "epsilon_gamma_box-merge", "guided_backprop-softplus"],
)
def test_successful_calls_leave_the_model_untouched(model, make_composite, canonizer_list) -> None:
    before = snapshot(model)
    x, grad_output = _inputs()
    x_version, g_version = x._version, grad_output._version
    x_copy, g_copy = x.clone(), grad_output.clone()
    params = dict(model.named_parameters())
    fn = lrpfunc.attribute(model, make_composite(), canonizer_list)
    output, relevance = fn(params, x, grad_output)
    assert relevance.shape == x.shape
    assert_untouched(model, before)
    fn_params = lrpfunc.attribute_with_params(model, make_composite(), canonizer_list)
    fn_params(params, x, grad_output)
    torch.func.grad(lambda p: (fn(p, x, grad_output)[1] ** 2).sum())(params)
    torch.func.vmap(fn, in_dims=(None, 0, 0))(params, x.unsqueeze(1), grad_output.unsqueeze(1))
    lrpfunc.rule_table(model, make_composite(), x, canonizer_list)
    ((fn(params, x, grad_output)[1]) ** 2).sum().backward()  # autograd into the model's own parameters
    for p in model.parameters():
        p.grad = None
    assert_untouched(model, before)
    # the inputs are not written either
    assert x._version == x_version and grad_output._version == g_version
    assert torch.equal(x, x_copy) and torch.equal(grad_output, g_copy)


def _failing_call(model: nn.Module, what: str):
    """A call that fails in the way ``what`` describes, and the exception it raises."""
    x, grad_output = _inputs()
    params = dict(model.named_parameters())
    eps = composites.epsilon_plus()
    raising = composites.layer_map([(nn.Conv2d, _raising_rule)])
    calls = {
        "wrong grad_output shape": (ValueError, lambda: lrpfunc.attribute(model, eps)(params, x, grad_output[:, :3])),
        "wrong grad_output structure": (ValueError, lambda: lrpfunc.attribute(model, eps)(params, x, (grad_output,))),
        "rule raises": (KeyError, lambda: lrpfunc.attribute(model, raising)(params, x, grad_output)),
        "rule raises inside grad": (
            KeyError,
            lambda: torch.func.grad(lambda p: lrpfunc.attribute(model, raising)(p, x, grad_output)[1].sum())(params),
        ),
        "rule raises inside vmap": (
            KeyError,
            lambda: torch.func.vmap(lrpfunc.attribute(model, raising), in_dims=(None, 0, 0))(
                params, x.unsqueeze(1), grad_output.unsqueeze(1)
            ),
        ),
        "forward raises": (RuntimeError, lambda: lrpfunc.attribute(model, eps)(params, x[:, :2], grad_output)),
        "rule error": (
            lrpfunc.RuleError,
            lambda: lrpfunc.attribute(model, composites.layer_map([(nn.Conv2d, rules.passthrough())]))(
                params, x, grad_output
            ),
        ),
        "unknown params": (ValueError, lambda: lrpfunc.attribute(model, eps)({**params, "nope": x}, x, grad_output)),
        "bad input": (TypeError, lambda: lrpfunc.attribute(model, eps)(params, "x", grad_output)),
    }
    return calls[what]


FAILURES = [
    "wrong grad_output shape",
    "wrong grad_output structure",
    "rule raises",
    "rule raises inside grad",
    "rule raises inside vmap",
    "forward raises",
    "rule error",
    "unknown params",
    "bad input",
]


@pytest.mark.parametrize("what", FAILURES)
def test_failing_calls_leave_the_model_untouched(model, what: str) -> None:
    before = snapshot(model)
    x, grad_output = _inputs()
    params = dict(model.named_parameters())
    expected = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.resnet())(params, x, grad_output)[1]
    error, call = _failing_call(model, what)
    with pytest.raises(error):
        call()
    assert_untouched(model, before)
    # nothing is left behind that would change the next call or a plain forward
    again = lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.resnet())(params, x, grad_output)[1]
    assert torch.equal(again, expected), what
    assert torch.equal(model(x), before_output(model, x))
    assert_untouched(model, before)


def before_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(copy.deepcopy(model), {}, (x,))


def test_failure_of_a_training_mode_merge_leaves_the_model_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).to(D).train()
    before = snapshot(model)
    x = torch.randn(2, 1, 5, 5, dtype=D)
    with pytest.raises(ValueError, match="training mode"):
        lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())(
            dict(model.named_parameters()), x, torch.ones(2, 2, 3, 3, dtype=D)
        )
    assert_untouched(model, before)


@pytest.mark.filterwarnings("ignore::lrpfunc.TrainingModeWarning")
def test_training_mode_batchnorm_buffers_untouched_without_merge() -> None:
    """A model in training mode computes batch statistics; attribution must still not update the running
    statistics (nor ``num_batches_tracked``) that a plain forward pass would update."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2))
    model = model.to(D).train()
    before = snapshot(model)
    x = torch.randn(4, 1, 5, 5, dtype=D)
    plain = copy.deepcopy(model)
    expected = plain(x)  # this one updates the running statistics of the copy
    assert not torch.equal(plain[1].running_mean, model[1].running_mean)
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    output, _ = fn(dict(model.named_parameters()), x, torch.ones(4, 2, dtype=D))
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(model[1].running_mean, before["state"]["1.running_mean"]), "running_mean was updated"
    assert torch.equal(model[1].running_var, before["state"]["1.running_var"]), "running_var was updated"
    assert torch.equal(model[1].num_batches_tracked, before["state"]["1.num_batches_tracked"])
    assert model.training and model[1].training
    assert_untouched(model, before)


def test_eval_mode_batchnorm_with_buffers_in_params_leaves_module_buffers() -> None:
    """Buffers passed in ``params`` are used instead of the module's own, which stay as they are."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).to(D).eval()
    before = snapshot(model)
    x = torch.randn(2, 1, 5, 5, dtype=D)
    params = {**dict(model.named_parameters()), "1.running_mean": torch.full((2,), 0.5, dtype=D)}
    output, _ = lrpfunc.attribute(model)(params, x, torch.ones(2, 2, 3, 3, dtype=D))
    expected = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert not torch.allclose(output, model(x))
    assert_untouched(model, before)


# --------------------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------------------

CALLS_PER_THREAD = 20


def test_four_threads_give_the_sequential_results() -> None:
    model = _resnet()
    before = snapshot(model)
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.resnet())
    base = dict(model.named_parameters())
    jobs = []
    for k in range(4):
        x, grad_output = _inputs(seed=100 + k)
        # threads 2 and 3 also use their own parameters (substituted for the module's)
        params = base if k < 2 else {name: p * (1.0 + 0.1 * k) for name, p in base.items()}
        jobs.append((params, x, grad_output))
    sequential = [fn(*job) for job in jobs]

    barrier = threading.Barrier(4)

    def work(k: int) -> list:
        barrier.wait()
        return [fn(*jobs[k]) for _ in range(CALLS_PER_THREAD)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4)))
    for k, per_thread in enumerate(results):
        assert len(per_thread) == CALLS_PER_THREAD
        for output, relevance in per_thread:
            assert torch.equal(output, sequential[k][0]), f"thread {k}: output differs"
            assert torch.equal(relevance, sequential[k][1]), f"thread {k}: relevance differs"
    # the four jobs really differ
    assert all(not torch.equal(sequential[0][1], sequential[k][1]) for k in range(1, 4))
    assert_untouched(model, before)


def test_threads_mixing_composites_failures_and_plain_forwards() -> None:
    """Attribution with different composites, calls that fail and plain forward passes of the same model,
    all at once: each gets its sequential result, and no hook survives the last call."""
    model = _resnet()
    before = snapshot(model)
    params = dict(model.named_parameters())
    x, grad_output = _inputs(seed=7)
    fns = {
        "plain-gradient": lrpfunc.attribute(model),
        "epsilon_plus_flat": lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.resnet()),
        "beta_smooth": lrpfunc.attribute(model, composites.beta_smooth()),
    }
    expected = {name: fn(params, x, grad_output) for name, fn in fns.items()}
    with torch.no_grad():
        expected_plain = model(x)
    failing = lrpfunc.attribute(model, composites.layer_map([(types.Convolution, _raising_rule)]))
    barrier = threading.Barrier(5)

    def attribute_job(name: str) -> bool:
        barrier.wait()
        for _ in range(CALLS_PER_THREAD):
            output, relevance = fns[name](params, x, grad_output)
            assert torch.equal(relevance, expected[name][1]), name
            assert torch.equal(output, expected[name][0]), name
        return True

    def failing_job() -> bool:
        barrier.wait()
        for _ in range(CALLS_PER_THREAD):
            with pytest.raises(KeyError):
                failing(params, x, grad_output)
        return True

    def plain_job() -> bool:
        barrier.wait()
        for _ in range(CALLS_PER_THREAD):
            with torch.no_grad():
                assert torch.equal(model(x), expected_plain)
        return True

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(attribute_job, name) for name in fns]
        futures += [pool.submit(failing_job), pool.submit(plain_job)]
        assert all(f.result() for f in futures)
    assert_untouched(model, before)


def test_plain_forward_of_another_model_while_tracing_is_not_recorded() -> None:
    """A model used inside a rule (another model's forward running during the sweep) sees no tracing."""
    helper = nn.Linear(3, 3).to(D)
    helper_before = snapshot(helper)
    seen = []

    def rule_calling_a_model(call, grad_outputs):
        with torch.no_grad():
            seen.append(helper(torch.ones(1, 3, dtype=D)))
        return rules.passthrough()(call, grad_outputs)

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).to(D)
    fn = lrpfunc.attribute(model, composites.layer_map([(nn.ReLU, rule_calling_a_model)]))
    x = torch.randn(2, 3, dtype=D)
    fn(dict(model.named_parameters()), x, torch.ones(2, 2, dtype=D))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], helper(torch.ones(1, 3, dtype=D)), rtol=0, atol=0)
    assert_untouched(helper, helper_before)


def test_cnn_with_dropout_in_eval_mode_untouched() -> None:
    model = cnn().to(D).eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fn = lrpfunc.attribute(model, composites.epsilon_alpha2_beta1_flat(), canonizers.merge_batchnorm())
    first = fn(dict(model.named_parameters()), x, torch.ones(2, 5, dtype=D))[1]
    second = fn(dict(model.named_parameters()), x, torch.ones(2, 5, dtype=D))[1]
    assert torch.equal(first, second)
    assert_untouched(model, before)


def test_no_tensor_is_left_in_a_reference_cycle() -> None:
    """Every tensor of a call is freed when the call returns, not later by the cycle collector
    (merged BatchNorm calls once kept the whole record alive through their forward closure)."""
    import gc

    from models import TinyResNet

    model = TinyResNet().double().eval()
    fn = lrpfunc.attribute(model, lrpfunc.composites.epsilon_plus_flat(), lrpfunc.canonizers.resnet())
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fn(params, x, torch.ones(2, 5, dtype=torch.float64))
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        fn(params, x, torch.ones(2, 5, dtype=torch.float64))
        gc.collect()
        leaked = [obj for obj in gc.garbage if isinstance(obj, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leaked == []
