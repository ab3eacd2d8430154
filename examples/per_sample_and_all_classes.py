"""Per-sample and all-class attributions with ``torch.func``: no loops over samples or classes.

The user story: you want the explanation of every image in a batch for every class, e.g. to compare
"why a horizontal bar" with "why not a square". ``lrpfunc.attribute`` returns a pure function
``fn(params, x, grad_output)``, so ``torch.func`` transforms apply directly:

* ``torch.func.vmap(fn, in_dims=(None, 0, 0))`` maps over the samples (each keeps a batch dimension of
  one, so BatchNorm, Flatten and friends see the shapes they expect);
* ``torch.func.vmap(fn, in_dims=(None, None, 0))`` over the one-hot ``grad_output`` rows of all classes
  gives the relevance of every class in one call;
* the Jacobian w.r.t. ``grad_output`` gives the same, since LRP relevance is linear in ``grad_output``
  (true for every LRP rule; not for Guided Backprop or DeconvNet, which clip the gradient). With only a
  few classes, forward mode (``torch.func.jacfwd``: one JVP per class) is far cheaper than
  ``torch.func.jacrev`` (one VJP per relevance entry); the full run also checks ``jacrev`` on one image.

The script checks both against plain Python loops (the maximum relative difference is reported),
and writes ``all_classes.png``: one row per image, the input and then one heatmap per class (one
colour scale per row, so the classes compare).

Run it with ``python examples/per_sample_and_all_classes.py [OUT]`` (default
``./out/per_sample_and_all_classes``).
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
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(CLASSES)),
    )


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "per_sample_and_all_classes"))
    parser.add_argument("--fast", action="store_true", help="train briefly (for tests)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = make_model()
    train(model, 60 if fast else 200, generator)
    model = model.double()  # float64: exact comparisons
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, _, _ = make_shapes(args.samples, generator)
    x = x.double()
    n, k = len(x), len(CLASSES)
    eye = torch.eye(k, dtype=x.dtype)
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())

    # 1. per sample: vmap over the batch (each sample with a batch dimension of one) vs. a loop
    predicted = model(x).argmax(1)
    grad_output = eye[predicted]
    _, per_sample = torch.func.vmap(fn, in_dims=(None, 0, 0))(params, x[:, None], grad_output[:, None])
    per_sample = per_sample[:, 0]
    looped = torch.cat([fn(params, x[i:i + 1], grad_output[i:i + 1])[1] for i in range(n)])
    batched = fn(params, x, grad_output)[1]

    # 2. every class at once. (a) vmap over one-hot grad_output rows: one batched call
    one_hots = eye[:, None, :].expand(k, n, k)
    all_classes = torch.func.vmap(fn, in_dims=(None, None, 0))(params, x, one_hots)[1].movedim(0, 1)  # (n, k, ...)

    # (b) the Jacobian of the (linear) relevance w.r.t. grad_output, per sample. Forward mode needs one
    # JVP per class; torch.func.jacrev gives the same but needs one VJP per relevance entry (3 * 32 * 32)
    def relevance_of(x1: torch.Tensor, grad_output1: torch.Tensor) -> torch.Tensor:
        return fn(params, x1, grad_output1)[1]

    jacobian = torch.func.vmap(torch.func.jacfwd(relevance_of, argnums=1))(x[:, None], grad_output[:, None])
    by_jacobian = jacobian[:, 0, ..., 0, :].movedim(-1, 1)  # (n, 1, C, H, W, 1, k) -> (n, k, C, H, W)
    class_loop = torch.stack([fn(params, x, eye[[c] * n])[1] for c in range(k)], dim=1)
    if not fast:  # jacrev for the first image: slower, same numbers
        reverse = torch.func.jacrev(relevance_of, argnums=1)(x[:1], grad_output[:1])
        jacrev_difference = relative(reverse[0, ..., 0, :].movedim(-1, 0), class_loop[0])
    else:
        jacrev_difference = None

    result = {
        "per_sample_vmap_vs_loop": relative(per_sample, looped),
        "per_sample_vmap_vs_batched": relative(per_sample, batched),
        "all_classes_vmap_vs_loop": relative(all_classes, class_loop),
        "all_classes_jacfwd_vs_loop": relative(by_jacobian, class_loop),
        "first_image_jacrev_vs_loop": jacrev_difference,
        "shape_all_classes": tuple(all_classes.shape),
    }

    rows = []
    for row in range(n):
        bound = all_classes[row].sum(1).abs().max().item()  # one colour scale per row: classes compare
        rows.append([to_image(x[row])] + [heatmap(all_classes[row, c], vmin=-bound, vmax=bound) for c in range(k)])
    grid = image_grid(rows)
    path = out / "all_classes.png"
    grid.save(path)
    result["path"] = str(path)
    result["grid_size"] = grid.size
    result["relevance_sum_per_class"] = all_classes.sum((2, 3, 4)).tolist()
    result["predicted"] = predicted.tolist()

    print(f"relevance of {n} images for {k} classes: shape {result['shape_all_classes']}")
    for key in ("per_sample_vmap_vs_loop", "per_sample_vmap_vs_batched", "all_classes_vmap_vs_loop",
                "all_classes_jacfwd_vs_loop", "first_image_jacrev_vs_loop"):
        if result[key] is not None:
            print(f"  max relative difference {key:28s} {result[key]:.1e}")
    print(f"wrote {path} (columns: input, {', '.join(CLASSES)})")
    return result


if __name__ == "__main__":
    main()
