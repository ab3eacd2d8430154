"""Export an explainer for deployment: a model and its LRP rules as one ``torch.export`` program, reloaded and run
without lrpfunc.

The user story: heatmaps are needed where the research code is not, in a service or on another machine, from a
program that does not depend on lrpfunc, the model's Python class or tracing. This script

1. trains the small CNN of the quickstart (BatchNorm included) on the synthetic shapes task (``examples/common.py``)
   for a few seconds;
2. builds the attribution ``lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())``
   and exports it with its trained
   parameters (``lrpfunc.export``): a ``torch.export.ExportedProgram`` of ``(x, grad_output) -> (output, relevance)``,
   for any batch size (a dynamic batch dimension);
3. saves it (``torch.export.save``), loads it back (``torch.export.load``) and explains new images with it: the
   relevance equals the eager attribution's (printed: the largest difference), also for another batch size;
4. writes the exported program and a heatmap grid of the reloaded explainer's relevance.

Run it with ``python examples/export_explainer.py [OUT]`` (default ``./out/export_explainer``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from common import make_shapes, shapes_cnn, train

import lrpfunc
from lrpfunc import composites
from lrpfunc.image import save_heatmap_grid


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "export_explainer"), help="output folder")
    parser.add_argument("--fast", action="store_true", help="train briefly (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = shapes_cnn()
    train(model, 20 if fast else 150, generator)  # leaves eval mode
    params = {name: p.detach() for name, p in model.named_parameters()}
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), lrpfunc.canonizers.merge_batchnorm())

    example, labels, _ = make_shapes(4, generator)
    seed = torch.nn.functional.one_hot(labels, 3).to(example.dtype)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():  # torch's own deprecation notices while exporting
        warnings.simplefilter("ignore", DeprecationWarning)
        program = lrpfunc.export(fn, params, example, seed, dynamic_shapes=({0: batch}, {0: batch}))
        path = out / "explainer.pt2"
        torch.export.save(program, path)
        explainer = torch.export.load(path).module()

    new, new_labels, _ = make_shapes(6, generator)
    new_seed = torch.nn.functional.one_hot(new_labels, 3).to(new.dtype)
    _, relevance = explainer(new, new_seed)
    _, expected = fn(params, new, new_seed)
    difference = (relevance - expected).abs().max().item()
    grid = save_heatmap_grid(relevance.sum(1), out / "reloaded.png", ncols=6)
    seconds = time.perf_counter() - start
    print(f"exported {path} ({path.stat().st_size / 1024:.0f} KiB); the reloaded explainer on 6 new images (batch 4 at "
          f"export): max |relevance - eager| = {difference:.1e}")
    print(f"wrote {grid} in {seconds:.1f} s")
    return {"path": str(path), "difference": difference, "grid": str(grid), "seconds": seconds}


if __name__ == "__main__":
    main()
