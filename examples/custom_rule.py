"""Write your own LRP rule: a ZPlus rule for ReLU networks built from ``lrpfunc.rules.basic``.

The user story: the rule you need is not in ``lrpfunc.rules``. In Zennit you would subclass
``BasicHook``; in lrpfunc a rule is a value, built from the same ingredients (input, parameter and output
modifiers, a gradient mapper and a reducer) by :func:`lrpfunc.rules.basic`. This script

1. writes ``zplus_relu()``: positive weights only, every other parameter (the bias) zeroed, i.e.
   ``R_i = sum_j x_i w_ji^+ R_j / s(sum_i' x_i' w_ji'^+)``, the z+ rule for the non-negative inputs of a
   ReLU network, through ``lrpfunc.ParamMod(lambda w, name: w.clamp(min=0) if name in names else
   torch.zeros_like(w))``;
2. maps it to every dense and convolutional layer with ``composites.layer_map`` (activations pass the
   relevance on, average pools use the norm rule) and prints the rule table;
3. checks it against the closed form computed by hand, layer by layer, on a ReLU MLP (float64), and
   against the built-in ``rules.zplus(zero_params="bias")``, which is the same for non-negative inputs;
4. writes ``custom_rule.png`` for a small CNN trained for a second on synthetic shapes: rows are
   images, columns the input, the custom rule, and the built-in ``epsilon_plus_flat`` composite.

Run it with ``python examples/custom_rule.py [OUT]`` (default ``./out/custom_rule``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import lrpfunc
from lrpfunc import composites, rules, types
from lrpfunc.image import heatmap
from common import image_grid, make_shapes, to_image, train


def zplus_relu(stabilizer: float = 1e-6, names: tuple[str, ...] = ("weight",)) -> lrpfunc.rules.BasicRule:
    """z+ for ReLU networks: the parameters in ``names`` clamped to be positive, all others zeroed."""
    return rules.basic(
        input_modifiers=[lambda x: x],
        param_modifiers=[lrpfunc.ParamMod(lambda w, name: w.clamp(min=0) if name in names else torch.zeros_like(w))],
        output_modifiers=[lambda z: z],
        gradient_mapper=lambda grad, outputs: grad / lrpfunc.stabilize(outputs[0], stabilizer),
        reducer=lambda inputs, gradients: inputs[0] * gradients[0],
        name=f"zplus_relu(stabilizer={stabilizer})",
    )


def zplus_relu_composite() -> lrpfunc.composites.Composite:
    return composites.layer_map([
        (types.Activation, rules.passthrough()),
        (types.AvgPool, rules.norm()),
        (types.Linear, zplus_relu()),
    ])


def closed_form(mlp: nn.Sequential, x: torch.Tensor, grad_output: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rule by hand for ``Linear, ReLU, ..., Linear``: relevance passes ReLUs unchanged."""
    linears = [layer for layer in mlp if isinstance(layer, nn.Linear)]
    activations = [x]
    for layer in mlp:
        activations.append(layer(activations[-1]))
    inputs = [activations[i] for i, layer in enumerate(mlp) if isinstance(layer, nn.Linear)]
    relevance = grad_output
    for layer, a in zip(reversed(linears), reversed(inputs)):
        positive = layer.weight.clamp(min=0)
        z = a @ positive.T  # the bias is zeroed
        s = relevance / (z + torch.where(z >= 0, eps, -eps))
        relevance = a * (s @ positive)
    return relevance


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "custom_rule"))
    parser.add_argument("--fast", action="store_true", help="train briefly (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    # 1-3: the rule on a ReLU MLP, against the closed form and the built-in z+ rule
    mlp = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).double()
    mlp_params = {name: p.detach() for name, p in mlp.named_parameters()}
    x = torch.rand(6, 10, dtype=torch.float64, generator=generator)  # non-negative inputs
    grad_output = torch.eye(4, dtype=torch.float64)[torch.randint(0, 4, (6,), generator=generator)]
    composite = zplus_relu_composite()
    table = lrpfunc.rule_table(mlp, composite, x)
    print(table)
    _, relevance = lrpfunc.attribute(mlp, composite)(mlp_params, x, grad_output)
    with torch.no_grad():
        expected = closed_form(mlp, x, grad_output)
    builtin = composites.layer_map([(types.Activation, rules.passthrough()),
                                    (types.Linear, rules.zplus(zero_params="bias"))])
    _, relevance_builtin = lrpfunc.attribute(mlp, builtin)(mlp_params, x, grad_output)
    scale = expected.abs().max()
    result = {
        "closed_form_error": ((relevance - expected).abs().max() / scale).item(),
        "builtin_zplus_error": ((relevance - relevance_builtin).abs().max() / scale).item(),
        # z+ without bias passes all relevance on, up to the stabilizer (and neurons with z = 0)
        "conservation_error": (relevance.sum(1) - grad_output.sum(1)).abs().max().item(),
        "rule_table": str(table),
    }

    # 4: heatmaps on a small CNN
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3),
    )
    train(cnn, 60 if fast else 200, generator)
    params = {name: p.detach() for name, p in cnn.named_parameters()}
    images, labels, _ = make_shapes(4, generator)
    target = torch.eye(3)[labels]
    maps = [lrpfunc.attribute(cnn, c)(params, images, target)[1] for c in (composite, composites.epsilon_plus_flat())]
    grid = image_grid([[to_image(image)] + [heatmap(relevance[row]) for relevance in maps]
                       for row, image in enumerate(images)])
    path = out / "custom_rule.png"
    grid.save(path)
    result["path"] = str(path)

    print(f"custom rule vs closed form:       max relative difference {result['closed_form_error']:.1e}")
    print(f"custom rule vs rules.zplus(bias0): max relative difference {result['builtin_zplus_error']:.1e}")
    print(f"relevance conservation: |sum R_in - sum R_out| <= {result['conservation_error']:.1e}")
    print(f"wrote {path} (columns: input, zplus_relu, epsilon_plus_flat)")
    return result


if __name__ == "__main__":
    main()
