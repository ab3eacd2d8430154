"""Quickstart: train a small CNN for a few seconds, then explain its decisions with several methods.

The user story: you have a trained image classifier and want to see which pixels made it choose a
class. This script

1. makes a synthetic task (32x32 RGB images of a horizontal bar, a vertical bar or a square on a noisy
   background; the class is the shape) and trains a small CNN with BatchNorm on it for a few seconds;
2. builds one pure attribution function per method with ``lrpfunc.attribute`` (LRP composites, Guided
   Backprop, the plain gradient) and ``lrpfunc.integrated_gradients``;
3. writes ``quickstart.png`` to the output folder: one row per test image (labelled with its class and the
   model's prediction), the input in the first column and one heatmap per method in the others, each column
   titled, and a colour bar (red: positive relevance, blue: negative, white: none; each map scaled to its own
   largest magnitude);
4. reports the test accuracy and, per method, the share of positive relevance that lies on the object
   (the shape's pixels), next to the share of the image the object covers.

Run it with ``python examples/quickstart.py [OUT]`` (default ``./out/quickstart``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lrpfunc
from lrpfunc import canonizers, composites
from lrpfunc.image import heatmap, labelled_grid
from common import CLASSES, make_shapes, shapes_cnn, to_image, train

TITLES = {
    "input": "input",
    "gradient": "gradient",
    "integrated_gradients": "integrated gradients",
    "guided_backprop": "guided backprop",
    "epsilon_plus_flat": "LRP epsilon_plus_flat",
    "epsilon_gamma_box": "LRP epsilon_gamma_box",
    "epsilon_alpha2_beta1": "LRP epsilon_alpha2_beta1",
}
COLORBAR = ("positive relevance\n(red, the map's\nlargest value)", "0 (white)",
            "negative relevance\n(blue)")


def methods(low: float, high: float) -> dict[str, object]:
    """Name -> ``model -> fn(params, x, grad_output)`` for each method shown (a column of the grid)."""
    merge = canonizers.merge_batchnorm()
    return {
        "gradient": lambda m: lrpfunc.attribute(m),
        "integrated_gradients": lambda m: lrpfunc.integrated_gradients(m, n_iter=16),
        "guided_backprop": lambda m: lrpfunc.attribute(m, composites.guided_backprop()),
        "epsilon_plus_flat": lambda m: lrpfunc.attribute(m, composites.epsilon_plus_flat(), merge),
        "epsilon_gamma_box": lambda m: lrpfunc.attribute(m, composites.epsilon_gamma_box(low, high), merge),
        "epsilon_alpha2_beta1": lambda m: lrpfunc.attribute(m, composites.epsilon_alpha2_beta1(), merge),
    }


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "quickstart"), help="output folder")
    parser.add_argument("--fast", action="store_true", help="train briefly (for tests)")
    parser.add_argument("--samples", type=int, default=6, help="rows of the grid")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = shapes_cnn()
    start = time.perf_counter()
    loss = train(model, steps=80 if fast else 150, generator=generator)
    seconds = time.perf_counter() - start

    x_test, y_test, masks = make_shapes(256, generator)
    with torch.no_grad():
        predicted = model(x_test).argmax(1)
    accuracy = (predicted == y_test).float().mean().item()

    params = {name: p.detach() for name, p in model.named_parameters()}  # a heatmap: no tape for the parameters
    x, y, mask = x_test[: args.samples], y_test[: args.samples], masks[: args.samples]
    grad_output = torch.eye(len(CLASSES))[y]  # explain the true class of each image
    low, high = float(x_test.min()), float(x_test.max())  # the input domain, for the ZBox rule
    relevances, on_object = {}, {}
    for name, build in methods(low, high).items():
        _, relevance = build(model)(params, x, grad_output)
        relevance = relevance.detach().sum(1)  # sum over colour channels: (N, H, W)
        positive = relevance.clamp(min=0)
        on_object[name] = ((positive * mask).sum() / positive.sum().clamp(min=1e-12)).item()
        relevances[name] = relevance

    rows = [[to_image(x[i])] + [heatmap(relevances[name][i]) for name in relevances] for i in range(len(x))]
    labels = [f"{CLASSES[int(y[i])]}\n(predicted:\n{CLASSES[int(predicted[i])]})" for i in range(len(x))]
    grid = labelled_grid(rows, titles=[TITLES[name] for name in ["input", *relevances]], row_labels=labels,
                         colorbar="bwr", colorbar_labels=COLORBAR, cell_size=128)
    path = out / "quickstart.png"
    grid.save(path)

    result = {
        "path": str(path),
        "grid_size": grid.size,
        "rows": len(rows),
        "columns": ["input", *relevances],
        "row_labels": labels,
        "train_seconds": seconds,
        "final_loss": loss,
        "test_accuracy": accuracy,
        "object_area": mask.float().mean().item(),
        "positive_relevance_on_object": on_object,
    }
    print(f"trained for {seconds:.1f} s, final loss {loss:.3f}, test accuracy {accuracy:.3f}")
    print(f"the objects cover {result['object_area']:.1%} of the pixels; share of positive relevance on them:")
    for name, share in on_object.items():
        print(f"  {name:22s} {share:.1%}")
    print(f"wrote {path} ({grid.size[0]}x{grid.size[1]} pixels; columns: {', '.join(result['columns'])})")
    return result


if __name__ == "__main__":
    main()
