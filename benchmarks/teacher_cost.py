"""What the frozen teacher costs a student epoch: KD with the teacher-output cache, KD without
it, and CE-only, on the same generated CIFAR-sized data (crop+flip augmentation).

The teacher has several times the student's FLOPs. Each mode trains the same student with
`fit`, the modes taking turns epoch by epoch: one warm-up round, then `--epochs` timed rounds
(fit's own `epoch_time`: train + val; the median per mode).
The cache is built once beforehand, as the first trial of a sweep does, and its build time is
reported separately: every later trial of the sweep reuses it.

    .venv/bin/python benchmarks/teacher_cost.py                      # 2-core CPU defaults
    .venv/bin/python benchmarks/teacher_cost.py --device cuda --train 50000 --teacher resnet32x4 \\
        --student resnet8x4 --precision bfloat16 --channels-last --batch-size 64
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from common import environment, fit_epoch_seconds, training_parser, training_setup, write_json

from kd_core.cache import build_cache
from kd_core.cost import flop_count
from kd_core.distillers import DISTILLERS
from kd_core.models import build_model
from kd_core.recipes import Recipe


def main() -> None:
    parser = training_parser(__doc__, train=2000, epochs=3)
    parser.add_argument("--teacher", default="resnet32")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--views", type=int, default=4, help="cached augmentation views per image")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    device, data = training_setup(args)
    one_epoch_recipe = Recipe(epochs=1, batch_size=args.batch_size, lr=0.05)
    torch.manual_seed(0)
    teacher = build_model(args.teacher, args.classes, 3).to(device).eval()
    example = next(data.val.batches(1))[0]
    flops = {"teacher": flop_count(teacher, example),
             "student": flop_count(build_model(args.student, args.classes, 3).to(device), example)}

    def distiller(method: str, sources: list) -> torch.nn.Module:
        torch.manual_seed(1)
        student = build_model(args.student, args.classes, 3)
        return DISTILLERS.get(method)(student, sources, DISTILLERS.get(method).make_params({})).to(device)

    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        cache = build_cache(root, [("teacher", teacher)], "generated", data.train, views=args.views)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        build_seconds = time.perf_counter() - started
        modes = {"ce_only": (distiller("ce", []), {}),
                 "kd_cache": (distiller("kd", [teacher]), {"source_cache": cache}),
                 "kd_no_cache": (distiller("kd", [teacher]), {})}
        # Modes take turns epoch by epoch (rotating who goes first), so load changes hit them alike.
        runs: dict[str, list[float]] = {name: [] for name in modes}
        for round_ in range(args.epochs + 1):
            shift = round_ % len(modes)  # each mode goes first in turn
            for name, (model, options) in [*modes.items()][shift:] + [*modes.items()][:shift]:
                seconds = fit_epoch_seconds(model, data, one_epoch_recipe, precision=args.precision,
                                            channels_last=args.channels_last, **options)
                if round_ > 0:  # the first round warms up
                    runs[name].append(seconds)
    median = {name: statistics.median(s) for name, s in runs.items()}
    ratios = {"kd_cache_over_ce": median["kd_cache"] / median["ce_only"],
              "kd_no_cache_over_kd_cache": median["kd_no_cache"] / median["kd_cache"]}
    print(f"{args.train} images 3x32x32, {args.classes} classes, batch {args.batch_size}, device {device}, "
          f"precision {args.precision}, channels_last {args.channels_last}, torch threads {torch.get_num_threads()}")
    print(f"teacher {args.teacher}: {flops['teacher'] / 1e6:.1f} MFLOPs/image, student {args.student}: "
          f"{flops['student'] / 1e6:.1f} MFLOPs/image ({flops['teacher'] / flops['student']:.1f}x)")
    print(f"{'mode':<14} {'s/epoch (median)':>17}")
    for name, value in median.items():
        print(f"{name:<14} {value:>17.3f}")
    print(f"cache build ({args.views} views, once per sweep): {build_seconds:.2f} s")
    print(f"KD with cache / CE-only:       {ratios['kd_cache_over_ce']:.3f}  (target <= 1.15)")
    print(f"KD without cache / with cache: {ratios['kd_no_cache_over_kd_cache']:.2f}  (target >= 1.5)")
    write_json("teacher_cost" + ("_cuda" if device.type == "cuda" else ""), {
        "config": vars(args), "flops": flops, "environment": environment(device),
        "epoch_seconds": runs, "median_epoch_seconds": median, "cache_build_seconds": build_seconds, "ratios": ratios,
    }, args.json)


if __name__ == "__main__":
    main()
