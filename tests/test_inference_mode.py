"""Attribution under ``torch.inference_mode()``: the same relevance as under ``torch.no_grad()``.

Inference mode turns autograd off entirely, and the modified backward pass is built from autograd's pullbacks; the
attribution functions leave it for their own work, and copy inference tensors among their arguments (an input or
parameters made inside inference mode) into ordinary ones.
"""

from __future__ import annotations

import pytest
import torch
import zoo

import lrpfunc
from lrpfunc import canonizers, composites

SETUPS = {
    "gradient": (None, ()),
    "epsilon_plus_flat+merge_batchnorm": (composites.epsilon_plus_flat(), (canonizers.merge_batchnorm(),)),
}


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    model, x = zoo.build("resnet_basic"), zoo.example_input("resnet_basic")
    params = {name: value.detach() for name, value in model.named_parameters()}
    return model, params, x, zoo.target_of("resnet_basic", model(x).detach())


@pytest.mark.parametrize("setup", list(SETUPS))
def test_inference_mode_gives_the_relevance_of_no_grad(resnet, setup: str) -> None:
    model, params, x, grad_output = resnet
    composite, canonizer = SETUPS[setup]
    fn = lrpfunc.attribute(model, composite, canonizer)
    with torch.no_grad():
        expected_output, expected = fn(params, x, grad_output)
    assert expected.abs().max() > 0
    with torch.inference_mode():
        inference_x, inference_params = x.clone(), {name: value.clone() for name, value in params.items()}
        for arguments in ((params, x), (inference_params, inference_x)):  # ordinary tensors, inference tensors
            output, relevance = fn(*arguments, grad_output)
            assert not relevance.is_inference()
            torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
            torch.testing.assert_close(relevance, expected, rtol=0, atol=0)
        cached = lrpfunc.cached(fn)
        for _ in range(2):  # traced, then replayed
            torch.testing.assert_close(cached(inference_params, inference_x, grad_output)[1], expected,
                                       rtol=1e-12, atol=1e-14)


def test_every_attribution_function_works_under_inference_mode(resnet) -> None:
    model, params, x, grad_output = resnet
    composite, canonizer = SETUPS["epsilon_plus_flat+merge_batchnorm"]
    with_params = lrpfunc.attribute_with_params(model, composite, canonizer)
    layers = lrpfunc.attribute_layers(model, composite, ["layer1"], canonizer)
    report = lrpfunc.conservation(model, composite, canonizer)
    with torch.no_grad():
        expected = (with_params(params, x, grad_output), layers(params, x, grad_output), report(params, x, grad_output),
                    lrpfunc.rule_table(model, composite, x, canonizer))
    with torch.inference_mode():
        got = (with_params(params, x, grad_output), layers(params, x, grad_output), report(params, x, grad_output),
               lrpfunc.rule_table(model, composite, x, canonizer))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    assert got[2].total_out == pytest.approx(expected[2].total_out, rel=1e-12)
    assert str(got[3]) == str(expected[3])
