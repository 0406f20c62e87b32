"""What the frozen teacher costs a student epoch, and what the teacher-output cache costs and
saves, on generated CIFAR-sized data (crop+flip augmentation, the cache's default settings: one
view per image per epoch, float16).

Modes, each training the same student with `fit`, taking turns epoch by epoch (one warm-up
round, then `--epochs` timed rounds; fit's own `epoch_time`: train + val; the median per mode):

- ce_only: the CE baseline (no teacher);
- kd_no_cache: KD running the teacher on every batch;
- kd_cache: KD reading an epoch the cache already holds (every trial after the first);
- kd_cache_fill: KD on an epoch the cache does not hold yet (the first trial of a sweep: the
  epoch's logits are computed and written before its first batch).

The cache's own cost is measured directly too: seconds to fill one (seed, epoch) file and its
bytes on disk. The figures are then scaled to the CIFAR-100 spec sizes (`--spec-train` images,
`--spec-epochs` epochs, 100 classes): disk per training seed, fill seconds (paid once per seed,
inside the first trial) and teacher seconds saved by every later trial, with the teacher measured
here. A bank of `--bank-views` views (`views: K`, an approximation) is measured for comparison.

    .venv/bin/python benchmarks/teacher_cost.py                      # 2-core CPU defaults, ~3 min
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

FILL_SEEDS = 1_000  # kd_cache_fill trains with seed FILL_SEEDS + round: an epoch the cache lacks


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = training_parser(__doc__, train=2000, epochs=3)
    parser.add_argument("--teacher", default="resnet32")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--spec-train", type=int, default=45_000, help="training images of the spec (CIFAR-100 "
                        "with val_fraction 0.1)")
    parser.add_argument("--spec-epochs", type=int, default=240, help="epochs of the spec's recipe (crd)")
    parser.add_argument("--bank-views", type=int, default=4, help="views of the bank measured for comparison")
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
        cache = build_cache(root, [("teacher", teacher)], "generated", data.train)  # the defaults
        fills = []
        for seed in (1, 2):  # one (seed, epoch) file each: compute, write, memory-map
            started = time.perf_counter()
            cache.epoch_logits(seed, 1)
            _synchronize(device)
            fills.append(time.perf_counter() - started)
        epoch_bytes = cache.disk_bytes() / 2
        started = time.perf_counter()
        bank = build_cache(root, [("teacher", teacher)], "generated", data.train, views=args.bank_views)
        _synchronize(device)
        bank_seconds, bank_bytes = time.perf_counter() - started, bank.disk_bytes()

        modes = {"ce_only": (distiller("ce", []), {}),
                 "kd_no_cache": (distiller("kd", [teacher]), {}),
                 "kd_cache": (distiller("kd", [teacher]), {"source_cache": cache}),
                 "kd_cache_fill": (distiller("kd", [teacher]), {"source_cache": cache})}
        # Modes take turns epoch by epoch (rotating who goes first), so load changes hit them alike.
        runs: dict[str, list[float]] = {name: [] for name in modes}
        for round_ in range(args.epochs + 1):
            shift = round_ % len(modes)
            for name, (model, options) in [*modes.items()][shift:] + [*modes.items()][:shift]:
                seed = FILL_SEEDS + round_ if name == "kd_cache_fill" else 0  # kd_cache: seed 0's epoch 1, filled
                seconds = fit_epoch_seconds(model, data, one_epoch_recipe, seed=seed, precision=args.precision,
                                            channels_last=args.channels_last, **options)
                if round_ > 0:  # the first round warms up (and fills kd_cache's epoch)
                    runs[name].append(seconds)
    median = {name: statistics.median(s) for name, s in runs.items()}
    fill_seconds = statistics.median(fills)
    ratios = {"kd_cache_over_ce": median["kd_cache"] / median["ce_only"],
              "kd_no_cache_over_kd_cache": median["kd_no_cache"] / median["kd_cache"],
              "kd_cache_fill_over_kd_no_cache": median["kd_cache_fill"] / median["kd_no_cache"]}

    # At the spec's sizes: per-image costs measured here, times images and epochs.
    scale = args.spec_train / args.train
    saved_per_epoch = (median["kd_no_cache"] - median["kd_cache"]) * scale
    spec = {
        "train_images": args.spec_train, "epochs": args.spec_epochs, "classes": args.classes,
        "disk_bytes_per_seed": epoch_bytes * scale * args.spec_epochs,
        "fill_seconds_per_seed": fill_seconds * scale * args.spec_epochs,
        "saved_seconds_per_later_trial": saved_per_epoch * args.spec_epochs,
        "kd_trial_seconds_without_cache": median["kd_no_cache"] * scale * args.spec_epochs,
        "kd_trial_seconds_with_cache": median["kd_cache"] * scale * args.spec_epochs,
        "bank_disk_bytes": bank_bytes * scale, "bank_fill_seconds": bank_seconds * scale,
    }

    print(f"{args.train} images 3x32x32, {args.classes} classes, batch {args.batch_size}, device {device}, "
          f"precision {args.precision}, channels_last {args.channels_last}, torch threads {torch.get_num_threads()}")
    print(f"teacher {args.teacher}: {flops['teacher'] / 1e6:.1f} MFLOPs/image, student {args.student}: "
          f"{flops['student'] / 1e6:.1f} MFLOPs/image ({flops['teacher'] / flops['student']:.1f}x)")
    print(f"{'mode':<14} {'s/epoch (median)':>17}")
    for name, value in median.items():
        print(f"{name:<14} {value:>17.3f}")
    print(f"cache fill, one (seed, epoch): {fill_seconds:.2f} s, {epoch_bytes / 1e6:.2f} MB on disk")
    print(f"KD with cache / CE-only:            {ratios['kd_cache_over_ce']:.3f}  (target <= 1.15)")
    print(f"KD without cache / with cache:      {ratios['kd_no_cache_over_kd_cache']:.2f}  (target >= 1.5)")
    print(f"KD filling the cache / without it:  {ratios['kd_cache_fill_over_kd_no_cache']:.2f}  (the first trial)")
    print(f"At the CIFAR-100 spec sizes ({args.spec_train} images, {args.classes} classes, {args.spec_epochs} epochs, "
          f"float16, teacher {args.teacher} on this {device}):")
    print(f"  cache on disk per training seed:    {spec['disk_bytes_per_seed'] / 1e9:.2f} GB")
    print(f"  fill, once per seed (first trial):  {spec['fill_seconds_per_seed'] / 3600:.2f} h")
    print(f"  saved by every later trial:         {spec['saved_seconds_per_later_trial'] / 3600:.2f} h of "
          f"{spec['kd_trial_seconds_without_cache'] / 3600:.2f} h "
          f"({spec['saved_seconds_per_later_trial'] / spec['kd_trial_seconds_without_cache']:.0%})")
    print(f"  a bank of {args.bank_views} views instead (an approximation): "
          f"{spec['bank_disk_bytes'] / 1e9:.3f} GB, fill {spec['bank_fill_seconds'] / 60:.1f} min")
    write_json("teacher_cost" + ("_cuda" if device.type == "cuda" else ""), {
        "config": vars(args), "flops": flops, "environment": environment(device),
        "epoch_seconds": runs, "median_epoch_seconds": median, "fill_seconds_one_epoch": fills,
        "epoch_bytes": epoch_bytes, "bank_seconds": bank_seconds, "bank_bytes": bank_bytes,
        "ratios": ratios, "spec": spec,
    }, args.json)


if __name__ == "__main__":
    main()
