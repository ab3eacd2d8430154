"""Adversarial explanations: change the input so that its explanation shows what you want while the
model's output stays put (Dombrowski et al., 2019, "Explanations can be manipulated and geometry is to
blame", NeurIPS).

The user story: you want to test how robust an explanation method is. Given an input ``x``, a target
heatmap ``h_t`` (here: the LRP explanation of another image, whose object lies elsewhere) and the model
output ``g``, optimise ``x_adv`` (starting at ``x``) to minimise Dombrowski et al.'s loss

    ||h(x_adv) - h_t||^2 / ||h(x) - h_t||^2  +  gamma * ||g(x_adv) - g(x)||^2 / ||g(x)||^2

(the two terms divided by their scale at the start, so that ``gamma`` is unit-free). The gradient of
the first term w.r.t. ``x_adv`` is a second-order derivative of the explanation: with ReLU it is zero
almost everywhere, so the attack uses the same network with every ReLU computed as softplus
(``lrpfunc.canonizers.softplus(beta=10.)``), exactly as in the paper. ``h`` is the LRP explanation
(``composites.epsilon_plus_flat()``) of the predicted class, summed over colour channels and normalised to
unit absolute sum.

Reported per image: the squared distance of the explanation to the target before and after (evaluated
with the real ReLU network), the relative change of the ReLU network's output and of the input, and
whether the predicted class stayed the same. Pictures: ``adversarial_explanation.png`` with columns
original input, manipulated input, explanation of the original, explanation of the manipulated
input, target explanation.

On this tiny 32x32 task the input has to change visibly; on ImageNet-size networks the paper's
manipulations are imperceptible.

Run it with ``python examples/adversarial_explanation.py [OUT]`` (default
``./out/adversarial_explanation``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import lrpfunc
from lrpfunc import canonizers, composites
from lrpfunc.image import heatmap
from common import CLASSES, image_grid, make_shapes, to_image, train

def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(CLASSES)),
    )


def explanation(fn, params, x: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and the channel-summed relevance normalised to unit absolute sum per image."""
    output, relevance = fn(params, x, grad_output)
    relevance = relevance.sum(1)
    return output, relevance / relevance.abs().sum((1, 2), keepdim=True)


def pick_pairs(masks: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """``count`` (source, target) pairs whose objects do not overlap."""
    pairs, used = [], set()
    for source in range(len(masks)):
        for target in range(len(masks)):
            if len(pairs) < count and source != target and source not in used and target not in used \
                    and not (masks[source] & masks[target]).any():
                pairs.append((source, target))
                used.update((source, target))
    return pairs


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "adversarial_explanation"))
    parser.add_argument("--fast", action="store_true", help="fewer steps (for tests)")
    parser.add_argument("--gamma", type=float, default=10.0, help="weight of the output term")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam step size on the input")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = make_model()
    train(model, 120 if fast else 300, generator)
    params = {name: p.detach() for name, p in model.named_parameters()}  # the model is fixed

    images, _, masks = make_shapes(32, generator)
    pairs = pick_pairs(masks, args.pairs)
    source, target = images[[s for s, _ in pairs]], images[[t for _, t in pairs]]
    low, high = float(images.min()), float(images.max())
    with torch.no_grad():
        predicted = model(source).argmax(1)
    grad_output = torch.eye(len(CLASSES))[predicted]

    composite = composites.epsilon_plus_flat()
    relu = lrpfunc.attribute(model, composite)  # the real explanation
    smooth = lrpfunc.attribute(model, composite, canonizers.softplus(beta=10.0))  # for the attack's gradient

    # the target: the (softplus) explanation of the other image for the same class as the source
    _, h_target = explanation(smooth, params, target, grad_output)
    output_start, h_start = explanation(smooth, params, source, grad_output)
    output_start, h_start = output_start.detach(), h_start.detach()
    scale_h = (h_start - h_target).square().sum((1, 2))
    scale_g = output_start.square().sum(1)

    x_adv = source.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_adv], lr=args.lr)
    steps = 150 if fast else 400
    for _ in range(steps):
        output, h = explanation(smooth, params, x_adv, grad_output)
        loss = ((h - h_target).square().sum((1, 2)) / scale_h
                + args.gamma * (output - output_start).square().sum(1) / scale_g).sum()
        optimizer.zero_grad()
        loss.backward()  # second order through lrpfunc: d/dx of the explanation
        optimizer.step()
        with torch.no_grad():
            x_adv.clamp_(low, high)  # stay in the data domain
    x_adv = x_adv.detach()

    # evaluate with the real (ReLU) network
    with torch.no_grad():
        _, h_target_relu = explanation(relu, params, target, grad_output)
        output_before, h_before = explanation(relu, params, source, grad_output)
        output_after, h_after = explanation(relu, params, x_adv, grad_output)
    distance_before = (h_before - h_target_relu).square().sum((1, 2))
    distance_after = (h_after - h_target_relu).square().sum((1, 2))
    output_change = (output_after - output_before).norm(dim=1) / output_before.norm(dim=1)
    input_change = (x_adv - source).flatten(1).norm(dim=1) / source.flatten(1).norm(dim=1)

    grid = image_grid([
        [to_image(source[row], low, high), to_image(x_adv[row], low, high),
         heatmap(h_before[row]), heatmap(h_after[row]), heatmap(h_target_relu[row])]
        for row in range(len(pairs))
    ])
    path = out / "adversarial_explanation.png"
    grid.save(path)

    result = {
        "path": str(path),
        "steps": steps,
        "distance_before": distance_before.tolist(),
        "distance_after": distance_after.tolist(),
        "relative_output_change": output_change.tolist(),
        "relative_input_change": input_change.tolist(),
        "same_prediction": (output_after.argmax(1) == predicted).tolist(),
    }
    print(f"{steps} Adam steps on the input, gamma={args.gamma}")
    print(f"{'image':>5s} {'dist before':>11s} {'dist after':>10s} {'output change':>13s} {'input change':>12s} "
          "same class")
    for i in range(len(pairs)):
        print(f"{i:5d} {distance_before[i]:11.5f} {distance_after[i]:10.5f} {output_change[i]:13.2%} "
              f"{input_change[i]:12.1%} {result['same_prediction'][i]}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
