"""Attribute a whole dataset across processes with ``torch.distributed``.

The user story: you want LRP heatmaps for every image of a dataset, and one process is too slow. Start
one process per core (or per GPU, or per node) with ``torchrun``; each rank attributes its own shard
and rank 0 gathers everything and saves it::

    torchrun --nproc_per_node=2 examples/distributed_attribution.py out/distributed_attribution
    python examples/distributed_attribution.py out/single --single        # one process, for comparison

The same code runs multi-node and on GPUs: ``torchrun --nnodes=... --nproc_per_node=<GPUs per node>
... --backend nccl`` puts rank ``r`` on ``cuda:LOCAL_RANK``. The attribution function is pure, so
nothing about it needs to be synchronised: every rank builds the same model (here from a fixed seed;
in practice you load the same checkpoint) and calls ``lrpfunc.attribute`` on its shard (indices
``rank, rank + world_size, ...``). A ``tqdm`` progress bar runs on rank 0 only. The shards are
collected on rank 0 with ``dist.gather_object`` and put back in dataset order.

Written to the output folder (by rank 0, or the single process): ``relevance.pt`` (a dict with the
relevance of every image, the predicted classes, the world size and the backend) and
``heatmaps.png`` (a grid of the first 16 heatmaps).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import lrpfunc
from lrpfunc import canonizers, composites
from lrpfunc.image import save_heatmap_grid


def make_dataset(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """``n`` synthetic images (n, 3, 32, 32): a bright bar or square on noise; the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(n, 3, size, size, generator=generator)
    for i in range(n):
        kind = int(torch.randint(0, 3, (1,), generator=generator))
        length = int(torch.randint(8, 20, (1,), generator=generator))
        height, width = [(3, length), (length, 3), (8, 8)][kind]
        top = int(torch.randint(0, size - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - width + 1, (1,), generator=generator))
        images[i, :, top:top + height, left:left + width] += 1.0
    return images


def make_model(seed: int) -> nn.Module:
    """The model every rank uses; replace this with loading your checkpoint."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    )
    return model.eval()


def attribute_shard(
    model: nn.Module, images: torch.Tensor, indices: list[int], batch_size: int, device: torch.device, show: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance (epsilon_plus_flat, BatchNorm merged) and predicted class of ``images[indices]``."""
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())
    params = {name: p.detach() for name, p in model.named_parameters()}
    relevances, predictions = [], []
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch in tqdm(batches, desc="attributing", unit="batch", disable=not show):
        x = images[batch].to(device)
        with torch.no_grad():
            predicted = model(x).argmax(1)
        grad_output = torch.eye(5, device=device)[predicted]  # explain the predicted class
        _, relevance = fn(params, x, grad_output)
        relevances.append(relevance.detach().cpu())
        predictions.append(predicted.cpu())
    if not relevances:
        return torch.empty(0, *images.shape[1:]), torch.empty(0, dtype=torch.long)
    return torch.cat(relevances), torch.cat(predictions)


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "distributed_attribution"))
    parser.add_argument("--single", action="store_true", help="compute everything in this one process")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"),
                        help="gloo (CPU) or nccl (one GPU per process)")
    parser.add_argument("--samples", type=int, default=None, help="dataset size (default 256, 32 with --fast)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fast", action="store_true", help="a small dataset (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    samples = args.samples if args.samples is not None else (32 if fast else 256)
    out = Path(args.out)

    distributed = not args.single and "WORLD_SIZE" in os.environ
    if not args.single and not distributed:
        print("not started by torchrun: computing in this one process (as --single)")
    if distributed:
        dist.init_process_group(backend=args.backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    if distributed and args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    try:
        start = time.perf_counter()
        images = make_dataset(samples, args.seed)
        model = make_model(args.seed).to(device)
        indices = list(range(rank, samples, world_size))  # this rank's shard
        relevance, predicted = attribute_shard(model, images, indices, args.batch_size, device, show=rank == 0)

        if distributed:
            shards = [None] * world_size if rank == 0 else None
            dist.gather_object((indices, relevance, predicted), shards, dst=0)
        else:
            shards = [(indices, relevance, predicted)]
        if rank != 0:
            return {"rank": rank}

        full = torch.zeros(samples, *images.shape[1:])
        predictions = torch.zeros(samples, dtype=torch.long)
        for shard_indices, shard_relevance, shard_predicted in shards:
            full[shard_indices] = shard_relevance
            predictions[shard_indices] = shard_predicted
        seconds = time.perf_counter() - start
        out.mkdir(parents=True, exist_ok=True)
        path = out / "relevance.pt"
        torch.save({"relevance": full, "predictions": predictions, "world_size": world_size,
                    "backend": args.backend if distributed else "single"}, path)
        grid = save_heatmap_grid(full[:16], out / "heatmaps.png", ncols=8)
        result = {
            "rank": 0,
            "world_size": world_size,
            "samples": samples,
            "seconds": seconds,
            "relevance_path": str(path),
            "heatmaps_path": str(grid),
            "relevance_total": full.sum().item(),
            "shard_sizes": [len(shard[0]) for shard in shards],
        }
        print(f"{samples} images attributed by {world_size} process(es) in {seconds:.1f} s "
              f"(shards: {result['shard_sizes']}); wrote {path} and {grid}")
        return result
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
