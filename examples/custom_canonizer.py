"""Write your own canonizer: compute every ReLU as a softplus, to get useful second-order gradients.

The user story: you want the input direction that changes an explanation the most (the "adversarial
direction" of Dombrowski et al., 2019). That is a second derivative of the model. For a ReLU network it
vanishes almost everywhere: the gradient explanation is piecewise constant in the input. The remedy is
to differentiate a smooth copy of the network, with every ReLU replaced by ``softplus(x; beta)``.

A canonizer is a rewrite of lrpfunc's own record of the forward pass; your module is never touched.
This one subclasses ``lrpfunc.canonizers.Canonizer`` (a frozen dataclass) and overrides ``replace_op``,
which sees every torch function the forward pass calls and may return a replacement. The script

1. defines ``SoftplusReLU(beta)`` in a few lines;
2. builds a small VGG-like CNN (conv-conv-pool-conv-pool-dense-dense; average pooling, since max pooling
   would leave kinks where the maximum switches, even with softplus), trains it for a moment on synthetic
   shapes and takes the gradient explanation ``h(x) = lrpfunc.attribute(model)(params, x, e_y)``;
3. computes the adversarial direction ``d = grad_x sum(h(x) * object mask)`` (how to move the input to
   change the explanation on the object) with ``torch.func.grad``, once for the ReLU network (exactly
   zero), once with the custom canonizer (not zero), and checks it against the built-in
   ``lrpfunc.canonizers.softplus`` and against central finite differences;
4. writes ``custom_canonizer.png``: rows are images, columns the input, the gradient explanation of
   the ReLU and of the softplus network, and the adversarial direction (summed over colour channels).

Run it with ``python examples/custom_canonizer.py [OUT]`` (default ``./out/custom_canonizer``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lrpfunc
from lrpfunc import canonizers
from lrpfunc.image import heatmap
from common import image_grid, make_shapes, to_image, train


@dataclasses.dataclass(frozen=True)
class SoftplusReLU(lrpfunc.canonizers.Canonizer):
    """Run ``softplus(x; beta) = log(1 + exp(beta x)) / beta`` wherever the model runs a ReLU."""

    beta: float = 10.0

    def replace_op(self, func: Callable[..., Any]) -> Callable[..., Any] | None:
        if func in (F.relu, torch.relu, torch.Tensor.relu):
            beta = self.beta
            # same arguments as the ReLU (``inplace`` included), which the softplus ignores
            return lambda input, *args, **kwargs: F.softplus(input, beta=beta)
        return None


def vgg_like() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(64, 3),
    )


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "custom_canonizer"))
    parser.add_argument("--fast", action="store_true", help="train briefly (for tests)")
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    model = vgg_like()
    train(model, 60 if fast else 200, generator, lr=2e-3)
    model = model.double()  # float64 for the finite-difference check
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, labels, masks = make_shapes(4, generator)
    x, masks = x.double(), masks[:, None].double()
    grad_output = torch.eye(3, dtype=x.dtype)[labels]

    explain = {
        "relu": lrpfunc.attribute(model),
        "custom softplus": lrpfunc.attribute(model, canonizers=SoftplusReLU(args.beta)),
        "built-in softplus": lrpfunc.attribute(model, canonizers=canonizers.softplus(beta=args.beta)),
    }

    def objective(fn):
        """The explanation's total on the object, as a function of the input."""
        return lambda inputs: (fn(params, inputs, grad_output)[1] * masks).sum()

    direction = {name: torch.func.grad(objective(fn))(x) for name, fn in explain.items()}

    # central finite differences along a random direction (smooth network only)
    v = torch.randn(x.shape, dtype=x.dtype, generator=generator)
    step = 1e-5
    f = objective(explain["custom softplus"])
    finite = ((f(x + step * v) - f(x - step * v)) / (2 * step)).item()
    exact = (direction["custom softplus"] * v).sum().item()

    with torch.no_grad():
        output_relu = explain["relu"](params, x, grad_output)[0]
        output_soft = explain["custom softplus"](params, x, grad_output)[0]
    result = {
        "relu_direction_max": direction["relu"].abs().max().item(),
        "softplus_direction_max": direction["custom softplus"].abs().max().item(),
        "custom_vs_builtin": (direction["custom softplus"] - direction["built-in softplus"]).abs().max().item(),
        "finite_difference": finite,
        "exact_directional": exact,
        "finite_difference_relative_error": abs(finite - exact) / max(abs(finite), 1e-12),
        "relative_output_change_softplus": ((output_soft - output_relu).norm() / output_relu.norm()).item(),
    }

    heatmaps = [explain["relu"](params, x, grad_output)[1], explain["custom softplus"](params, x, grad_output)[1],
                direction["custom softplus"]]
    grid = image_grid([[to_image(x[row])] + [heatmap(maps[row].detach()) for maps in heatmaps] for row in range(len(x))])
    path = out / "custom_canonizer.png"
    grid.save(path)
    result["path"] = str(path)

    print(f"adversarial direction, ReLU network:     max |d| = {result['relu_direction_max']:.1e} (no signal)")
    print(f"adversarial direction, SoftplusReLU:     max |d| = {result['softplus_direction_max']:.1e}")
    print(f"custom vs built-in softplus canonizer:   max difference {result['custom_vs_builtin']:.1e}")
    print(f"directional derivative: exact {exact:.6e}, finite differences {finite:.6e} "
          f"(relative error {result['finite_difference_relative_error']:.1e})")
    print(f"softplus(beta={args.beta}) changes the output by {result['relative_output_change_softplus']:.2%}")
    print(f"wrote {path} (columns: input, gradient (ReLU), gradient (softplus), adversarial direction)")
    return result


if __name__ == "__main__":
    main()
