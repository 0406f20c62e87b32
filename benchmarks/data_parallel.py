"""Speed-up of a trial on 2 data-parallel workers (DDP, `sweep.workers_per_trial: 2`) over 1.

The same `fit` (CE-only student, generated CIFAR-sized data with crop+flip, the same global
batches) runs three ways, measured in this run: one process with T threads (`--threads`,
default 1: a 1-worker trial with `cpus_per_trial: 1`), 2 DDP ranks of T threads each (gloo; a
2-worker trial with `cpus_per_trial: 2`), and, for reference, one process with 2T threads (a
1-worker trial with `cpus_per_trial: 2`). The figure is the median training epoch time (`epoch_time`: train + rank
0's val) after one warm-up epoch; the ratios are the speed-ups. With `--device cuda`, each rank
takes one GPU (NCCL) and the one-process runs take the first.

    .venv/bin/python benchmarks/data_parallel.py                  # 2-core CPU defaults
    .venv/bin/python benchmarks/data_parallel.py --device cuda --train 50000 --model resnet32x4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import environment, generated_cifar, training_parser, write_json

from cluster.processes import port_block
from kd_core.distillers import DISTILLERS
from kd_core.distributed import join, leave
from kd_core.models import build_model
from kd_core.recipes import Recipe
from kd_core.train import EpochReport, fit


def epoch_seconds(args: argparse.Namespace, threads: int, rank: int = 0, world: int = 1,
                  init_method: str | None = None) -> list[float]:
    """Epoch times of one process (rank `rank` of `world`), warm-up epoch left out."""
    torch.set_num_threads(threads)
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    parallel = join(rank, world, init_method, device) if world > 1 else None
    try:
        data = generated_cifar(args.train, args.classes).to(device)
        torch.manual_seed(0)
        ce = DISTILLERS.get("ce")
        distiller = ce(build_model(args.model, args.classes, 3), [], ce.make_params()).to(device)
        reports: list[EpochReport] = []
        recipe = Recipe(epochs=args.epochs + 1, batch_size=args.batch_size, lr=0.05)
        fit(distiller, data, recipe, callback=reports.append, data_parallel=parallel,
            channels_last=args.channels_last)
    finally:
        if parallel is not None:
            leave()
    return [r.metrics["epoch_time"] for r in reports[1:]]


def _rank(rank: int, args: argparse.Namespace, world: int, init_method: str, out: str) -> None:
    seconds = epoch_seconds(args, args.threads, rank, world, init_method)
    if rank == 0:
        Path(out).write_text(json.dumps(seconds))


def data_parallel_seconds(args: argparse.Namespace, world: int) -> list[float]:
    with tempfile.TemporaryDirectory() as directory:
        out = str(Path(directory) / "rank0.json")
        mp.start_processes(_rank, args=(args, world, f"tcp://127.0.0.1:{port_block(1)}", out), nprocs=world,
                           start_method="spawn", join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = training_parser(__doc__, train=4000, epochs=3)
    parser.add_argument("--model", default="resnet8")
    parser.set_defaults(batch_size=128, threads=1)  # --threads: each worker's
    args = parser.parse_args()

    threads = args.threads
    one = statistics.median(epoch_seconds(args, threads))
    two_workers = statistics.median(data_parallel_seconds(args, 2))
    two_threads = statistics.median(epoch_seconds(args, 2 * threads)) if args.device == "cpu" else None
    print(f"{args.model}, {args.train} generated CIFAR images, batch {args.batch_size}, {args.device}")
    print(f"  {f'1 worker, {threads} thread(s):':34} {one:7.2f} s/epoch")
    print(f"  {f'2 workers (DDP), {threads} thread(s) each:':34} {two_workers:7.2f} s/epoch   "
          f"speed-up {one / two_workers:.2f}x")
    if two_threads is not None:
        print(f"  {f'1 worker, {2 * threads} thread(s):':34} {two_threads:7.2f} s/epoch   speed-up "
              f"{one / two_threads:.2f}x (2 workers vs {2 * threads} threads: {two_threads / two_workers:.2f}x)")
    write_json("data_parallel", {
        "environment": environment(args.device), "args": vars(args), "one_worker_s": one,
        "two_workers_s": two_workers, "two_threads_s": two_threads, "speedup_two_workers": one / two_workers,
        "speedup_two_threads": one / two_threads if two_threads else None,
    }, args.json)


if __name__ == "__main__":
    main()
