"""Throughput of `fit` against a minimal hand-written PyTorch loop: same model, data and optimizer.

Both train a CE-only student on generated CIFAR-sized data (device-resident, crop+flip) with
SGD (momentum 0.9, weight decay 5e-4) and evaluate val after each epoch (fit selects its best
epoch on val; the hand loop computes val accuracy). They take turns epoch by epoch: one
warm-up round, then `--epochs` timed rounds; the figure is training images per second of
epoch wall time (train + val), the median per loop.

    .venv/bin/python benchmarks/train_loop.py                        # 2-core CPU defaults
    .venv/bin/python benchmarks/train_loop.py --device cuda --train 50000 --model resnet8x4 \\
        --precision bfloat16 --channels-last --batch-size 64
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import environment, fit_epoch_seconds, training_parser, training_setup, write_json

from kd_core.distillers import DISTILLERS
from kd_core.models import build_model
from kd_core.recipes import Recipe


def main() -> None:
    parser = training_parser(__doc__, train=3000, epochs=5)
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    device, data = training_setup(args)
    recipe = Recipe(epochs=1, batch_size=args.batch_size, lr=0.05)
    memory_format = torch.channels_last if args.channels_last and device.type == "cuda" else torch.contiguous_format
    autocast = {"device_type": device.type, "dtype": getattr(torch, args.precision),
                "enabled": args.precision != "float32" and device.type == "cuda"}

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(args.model, args.classes, 3).to(device)

    distiller = DISTILLERS.get("ce")(student(), [], DISTILLERS.get("ce").make_params({}))

    def fit_epoch(epoch: int) -> float:
        return fit_epoch_seconds(distiller, data, recipe, seed=epoch, precision=args.precision,
                                 channels_last=args.channels_last)

    model = student().to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def hand_epoch(epoch: int) -> float:
        started = time.perf_counter()
        model.train()
        for images, labels in data.train.batches(args.batch_size, torch.Generator().manual_seed(epoch)):
            with torch.autocast(**autocast):
                loss = F.cross_entropy(model(images.contiguous(memory_format=memory_format)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = torch.zeros((), device=device)
        with torch.no_grad():
            for images, labels in data.val.batches(512):
                correct += (model(images).argmax(1) == labels).sum()
        correct.item()  # waits for the device, as fit's epoch end does
        return time.perf_counter() - started

    loops = {"fit": fit_epoch, "hand_loop": hand_epoch}
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for epoch in range(args.epochs + 1):
        order = list(loops.items()) if epoch % 2 else list(loops.items())[::-1]  # neither always goes first
        for name, run_epoch in order:
            elapsed = run_epoch(epoch)
            if epoch > 0:  # the first round warms up
                seconds[name].append(elapsed)
    throughput = {name: args.train / statistics.median(s) for name, s in seconds.items()}
    ratio = throughput["fit"] / throughput["hand_loop"]
    print(f"{args.model}, {args.train} images 3x32x32, batch {args.batch_size}, device {device}, "
          f"precision {args.precision}, channels_last {args.channels_last}, torch threads {torch.get_num_threads()}")
    print(f"{'loop':<10} {'s/epoch (median)':>17} {'images/s':>10}")
    for name, s in seconds.items():
        print(f"{name:<10} {statistics.median(s):>17.3f} {throughput[name]:>10,.0f}")
    print(f"fit / hand-written loop throughput: {ratio:.3f}  (target >= 0.95)")
    write_json("train_loop" + ("_cuda" if device.type == "cuda" else ""), {
        "config": vars(args), "environment": environment(device), "epoch_seconds": seconds,
        "images_per_second": throughput, "ratio_fit_over_hand_loop": ratio,
    }, args.json)


if __name__ == "__main__":
    main()
