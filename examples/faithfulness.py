"""Which attribution is most faithful to the model? Perturbation curves and ABPC on the shapes task.

The user story: several methods give plausible heatmaps; you want a number that says which of them reflects
what the model actually uses. Region perturbation (Samek et al. 2017) removes the input's patches in the order
of their relevance and watches the score: it should fall fast when the most relevant patches go first, and
slowly when the least relevant go first. The area between the two curves (ABPC) summarises both. This script

1. trains the quickstart's small CNN on the synthetic shapes task (bars and squares on noise);
2. builds every method as a pure function (``lrpfunc.attribute`` with LRP composites, Guided Backprop, the
   gradient and input x gradient, ``lrpfunc.integrated_gradients``) plus a random attribution as a floor;
3. scores each on held-out images with ``lrpfunc.evaluate.evaluate_dataset``: 4x4 patches (64 features per
   image) set to the baseline 0 (the noise's mean) in 16 steps, the score being the logit of the true class;
4. writes ``faithfulness.png`` (both curves of every method, one panel per order) and ``faithfulness.md``
   (the ABPC table, best first), and prints the table.

Run it with ``python examples/faithfulness.py [OUT]`` (default ``./out/faithfulness``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn

import lrpfunc
from lrpfunc import canonizers, composites
from lrpfunc.evaluate import evaluate_dataset
from common import CLASSES, make_shapes, shapes_cnn, train

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34)]


def methods(model: nn.Module, params: dict, low: float, high: float) -> dict[str, object]:
    """Name -> ``(x, target) -> relevance`` (the signature of ``evaluate_dataset``'s attribution_fn)."""
    merge = canonizers.merge_batchnorm()

    def seeded(fn):
        return lambda x, t: fn(params, x, torch.eye(len(CLASSES))[t])[1].detach()

    gradient = lrpfunc.attribute(model)
    generator = torch.Generator().manual_seed(1)
    return {
        "epsilon_plus_flat": seeded(lrpfunc.attribute(model, composites.epsilon_plus_flat(), merge)),
        "epsilon_gamma_box": seeded(lrpfunc.attribute(model, composites.epsilon_gamma_box(low, high), merge)),
        "epsilon_alpha2_beta1": seeded(lrpfunc.attribute(model, composites.epsilon_alpha2_beta1(), merge)),
        "integrated_gradients": seeded(lrpfunc.integrated_gradients(model, n_iter=16)),
        "input_x_gradient": lambda x, t: x * seeded(gradient)(x, t),
        "guided_backprop": seeded(lrpfunc.attribute(model, composites.guided_backprop())),
        "gradient": seeded(gradient),
        "random": lambda x, t: torch.rand(x.shape, generator=generator),
    }


def plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, size: tuple[int, int] = (420, 300)) -> None:
    """Two panels (most relevant first, least relevant first), one line per method, a legend below."""
    width, height = size
    margin, legend_row = 34, 14
    legend = legend_row * ((len(curves) + 1) // 2) + 8
    picture = Image.new("RGB", (2 * width, height + legend), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    values = torch.cat([torch.cat(pair) for pair in curves.values()])
    low, high = float(values.min()), float(values.max())
    for panel, title in enumerate(("most relevant first", "least relevant first")):
        left = panel * width
        x0, x1, y0, y1 = left + margin, left + width - 10, height - margin, 20
        draw.rectangle((x0, y1, x1, y0), outline=(0, 0, 0))
        draw.text((x0, 4), f"{title} - mean true-class logit", fill=(0, 0, 0))
        draw.text((x0, y0 + 4), "0", fill=(0, 0, 0))
        draw.text((x1 - 100, y0 + 4), "share removed = 1", fill=(0, 0, 0))
        for value in (low, high):
            y = y0 - (value - low) / (high - low) * (y0 - y1)
            draw.text((left + 2, y - 6), f"{value:.1f}", fill=(0, 0, 0))
        for color, curve in zip(COLORS, (pair[panel] for pair in curves.values())):
            steps = len(curve) - 1
            points = [(x0 + k / steps * (x1 - x0), y0 - (float(v) - low) / (high - low) * (y0 - y1))
                      for k, v in enumerate(curve)]
            draw.line(points, fill=color, width=2)
    for index, (name, color) in enumerate(zip(curves, COLORS)):
        x, y = 10 + (index % 2) * width, height + 4 + (index // 2) * legend_row
        draw.line((x, y + 6, x + 20, y + 6), fill=color, width=3)
        draw.text((x + 26, y), name, fill=(0, 0, 0))
    picture.save(path)


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "faithfulness"), help="output folder")
    parser.add_argument("--fast", action="store_true", help="train briefly, evaluate fewer images (for tests)")
    parser.add_argument("--images", type=int, default=512, help="held-out images evaluated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    images = 128 if fast else args.images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = shapes_cnn()
    train(model, steps=80 if fast else 150, generator=generator)
    x_test, y_test, _ = make_shapes(images, generator)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    params = {name: value.detach() for name, value in model.named_parameters()}
    data = [(x_test[i : i + 64], y_test[i : i + 64]) for i in range(0, images, 64)]

    def score(batch: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return model(batch).gather(1, target[:, None])[:, 0]

    low, high = float(x_test.min()), float(x_test.max())
    results = {}
    for name, attribution in methods(model, params, low, high).items():
        results[name] = evaluate_dataset(score, attribution, data, steps=16, patch=4, baseline=0.0, progress=False)
    ranking = sorted(results, key=lambda name: -float(results[name].abpc))
    table = ["| method | ABPC | AUC most relevant first | AUC least relevant first |", "| --- | --- | --- | --- |"]
    for name in ranking:
        r = results[name]
        table.append(f"| {name} | {float(r.abpc):.2f} | {float(r.auc_most):.2f} | {float(r.auc_least):.2f} |")
    (out / "faithfulness.md").write_text("\n".join(table) + "\n")
    plot({name: (results[name].curve_most, results[name].curve_least) for name in ranking}, out / "faithfulness.png")

    print(f"test accuracy {accuracy:.3f}; {images} held-out images, 4x4 patches set to 0 in 16 steps, "
          f"score = true-class logit (mean {float(results[ranking[0]].curve_most[0]):.2f} before any removal)")
    print("\n".join(table))
    print(f"wrote {out / 'faithfulness.png'} and {out / 'faithfulness.md'}")
    return {
        "test_accuracy": accuracy,
        "abpc": {name: float(results[name].abpc) for name in ranking},
        "ranking": ranking,
        "path": str(out / "faithfulness.png"),
        "table": str(out / "faithfulness.md"),
    }


if __name__ == "__main__":
    main()
