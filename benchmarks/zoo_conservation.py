#!/usr/bin/env python
"""Relevance conservation on the test zoo (torchvision-style architectures), float64: the README's table.

    python benchmarks/zoo_conservation.py

For every model of ``tests/zoo.py`` (small widths, randomised BatchNorm statistics), ``sum(R) / sum(grad_output)``
for the predicted class of each input (for the U-Net, the positive part of a class map) with:

- ``epsilon_plus(zero_params="bias")`` and ``merge_batchnorm()`` on the model as built (with its biases; the
  forward still adds them, so they absorb relevance);
- the same on the model with every bias zeroed (``zoo.without_biases``);
- epsilon on every linear layer instead of z+ (``zero_params="bias"``), biases zeroed: the rules that conserve by
  construction, so that any loss left would be an operation without its rule;

and the plain gradient (no rules) against ``torch.func.vjp`` (the largest absolute difference).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import lrpfunc  # noqa: E402
import zoo  # noqa: E402
from lrpfunc import canonizers, composites, ops, rules, types  # noqa: E402

CONVOLUTIONS = types.Convolution + (ops.Convolution,)


def target(name: str, output: torch.Tensor) -> torch.Tensor:
    """``zoo.target_of``; for a segmentation map whose class 0 is nowhere positive, the class with the most positive
    output instead (the positive part of its map)."""
    grad_output = zoo.target_of(name, output)
    if output.ndim == 4 and grad_output.sum() == 0:
        k = int(output.clamp(min=0).sum((0, 2, 3)).argmax())
        grad_output[:, k] = output[:, k].clamp(min=0)
    return grad_output


def ratio(model: torch.nn.Module, composite, x: torch.Tensor, name: str) -> float:
    grad_output = target(name, model(x).detach())
    _, relevance = lrpfunc.attribute(model, composite, canonizers.merge_batchnorm())(
        dict(model.named_parameters()), x, grad_output
    )
    return (relevance.sum() / grad_output.sum()).item()


def main() -> int:
    torch.set_num_threads(2)
    print("| model | no rules vs vjp | epsilon_plus, biases in | epsilon_plus, biases zeroed | "
          "epsilon, biases zeroed |")
    print("| --- | --- | --- | --- | --- |")
    plus = composites.epsilon_plus(zero_params="bias")
    epsilon = composites.epsilon_plus(zero_params="bias", layer_map=[(CONVOLUTIONS, rules.epsilon(zero_params="bias"))])
    for name in zoo.ZOO:
        model, x = zoo.build(name), zoo.example_input(name)
        params = dict(model.named_parameters())
        output, pullback = torch.func.vjp(lambda v: torch.func.functional_call(model, params, (v,)), x)
        seed = torch.randn_like(output)
        gradient = lrpfunc.attribute(model, None)(params, x, seed)[1]
        vjp_error = (gradient - pullback(seed)[0]).abs().max().item()
        bare = zoo.without_biases(zoo.build(name))
        cells = [ratio(model, plus, x, name), ratio(bare, plus, x, name), ratio(bare, epsilon, x, name)]
        print(f"| {name} | {vjp_error:.0e} | " + " | ".join(f"{value:.6f}" for value in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
