"""The training protocol and the teacher-output cache: each epoch's draws depend on (seed, epoch)
only; with augmentation and the cache on, a KD student trains on the batches it would see
without the cache (and its CE baseline of the same seed sees them too), with the teacher's
logits of exactly those views; cached logits equal a fresh forward; keys separate what differs;
concurrent fillers produce one valid cache; methods whose teacher changes never use it."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from kd_core.cache import (
    CACHE_FILE,
    build_cache,
    cache_key,
    epoch_draws,
    load_or_build,
    training_batches,
)
from kd_core.data.augment import CropFlipNormalize, Normalize
from kd_core.data.base import Dataset, Split
from kd_core.distillers import DISTILLERS, Distiller
from kd_core.models import build_model
from kd_core.recipes import Recipe
from kd_core.train import fit

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def cifar_like_split(n: int = 96, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Split(images, labels, CropFlipNormalize(4, True, mean=MEAN, std=STD))


def cifar_like_data(n: int = 96) -> Dataset:
    held_out = cifar_like_split(32, seed=1)
    held_out = Split(held_out.images, held_out.labels, Normalize(MEAN, STD))
    return Dataset("cifar_like", cifar_like_split(n), held_out, held_out, num_classes=10, in_channels=3)


def teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("convnet", 10, 3, {"width": 8, "depth": 1}).eval()


def distiller(method: str, sources: list[torch.nn.Module]) -> Distiller:
    torch.manual_seed(1)
    student = build_model("convnet", 10, 3, {"width": 4, "depth": 1})
    return DISTILLERS.get(method)(student, sources, DISTILLERS.get(method).make_params({}))


def recorded_fit(model: Distiller, data: Dataset, **options) -> list[tuple[torch.Tensor, torch.Tensor, list | None]]:
    """Every training step's (images, labels, cached source logits) of a 2-epoch fit."""
    steps = []
    forward_train = model.forward_train

    def recording(images, labels, position):
        cached = model.cached_source_logits
        steps.append((images.clone(), labels.clone(), None if cached is None else [c.clone() for c in cached]))
        return forward_train(images, labels, position)

    model.forward_train = recording
    fit(model, data, Recipe(epochs=2, batch_size=32, lr=0.05), seed=5, **options)
    return steps


# The protocol --------------------------------------------------------------------------------


def test_epoch_draws_depend_on_seed_and_epoch_only() -> None:
    split = cifar_like_split()
    first, again = epoch_draws(split, 3, 1), epoch_draws(split, 3, 1)
    assert torch.equal(first.order, again.order) and torch.equal(first.views, again.views)
    assert sorted(first.order.tolist()) == list(range(len(split)))
    assert first.views.shape == (len(split), 3)  # one view per image: crop offsets and the flip bit
    # a fresh view of each image every epoch, and another stream for another seed
    assert not torch.equal(epoch_draws(split, 3, 2).views, first.views)
    assert not torch.equal(epoch_draws(split, 4, 1).views, first.views)
    # the batch size only cuts the same sequence differently
    small = torch.cat([images for images, _ in training_batches(split, 16, 3, 1)])
    large = torch.cat([images for images, _ in training_batches(split, 40, 3, 1)])
    assert torch.equal(small, large)


def test_an_image_in_a_batch_is_its_view_of_the_epoch() -> None:
    split = cifar_like_split()
    draws = epoch_draws(split, 0, 2)
    images = torch.cat([batch for batch, _ in training_batches(split, 32, 0, 2)])
    expected = split.transform.apply(split.images[draws.order], draws.views[draws.order])
    assert torch.equal(images, expected)


# The cache keeps the protocol ----------------------------------------------------------------


def test_with_the_cache_a_kd_student_sees_the_batches_of_training_without_it(tmp_path: Path) -> None:
    data, source = cifar_like_data(), teacher()
    cache = build_cache(tmp_path, [("t", source)], "data", data.train, dtype="float32")
    assert cache.views is None  # default: one view per image per epoch
    cached = recorded_fit(distiller("kd", [source]), data, source_cache=cache)
    live = recorded_fit(distiller("kd", [source]), data)
    baseline = recorded_fit(distiller("ce", []), data)  # the CE baseline of the same seed
    assert len(cached) == len(live) == len(baseline) == 2 * 3  # 96 images, batch 32, 2 epochs
    for (images, labels, logits), (live_images, live_labels, _), (ce_images, ce_labels, _) in zip(
            cached, live, baseline):
        assert torch.equal(images, live_images) and torch.equal(labels, live_labels)
        assert torch.equal(images, ce_images) and torch.equal(labels, ce_labels)
        with torch.no_grad():  # the cached logits are the teacher's on exactly these views
            torch.testing.assert_close(logits[0], source(images), rtol=1e-5, atol=1e-5)
    # the two epochs show different views (fresh augmentation, as without the cache)
    first, second = torch.cat([s[0] for s in cached[:3]]), torch.cat([s[0] for s in cached[3:]])
    assert not torch.equal(first.sum((1, 2, 3)).sort().values, second.sum((1, 2, 3)).sort().values)


def test_per_epoch_logits_are_computed_once_per_seed_and_epoch(tmp_path: Path) -> None:
    data, source = cifar_like_data(), teacher()
    cache = build_cache(tmp_path, [("t", source)], "data", data.train)
    forwards = []
    source.register_forward_hook(lambda *_: forwards.append(1))
    fit(distiller("kd", [source]), data, Recipe(epochs=2, batch_size=32, lr=0.05), seed=5, source_cache=cache)
    assert len(forwards) == 2  # the first trial fills: one forward over the 96 images per epoch
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt"))
    key = cache_key("t", "data", data.train, None, 0, "float16")
    assert files == [f"{key}/seed5/epoch1.pt", f"{key}/seed5/epoch2.pt"]
    logits = torch.load(tmp_path / files[0], weights_only=True)["logits"]
    assert logits.shape == (96, 10) and logits.dtype == torch.float16
    assert cache.disk_bytes() == sum((tmp_path / f).stat().st_size for f in files)

    forwards.clear()  # a later trial (a fresh cache object, as in another worker) only reads
    again = build_cache(tmp_path, [("t", source)], "data", data.train)
    fit(distiller("kd", [source]), data, Recipe(epochs=2, batch_size=32, lr=0.05), seed=5, source_cache=again)
    assert forwards == []
    torch.testing.assert_close(again.epoch_logits(5, 1)[0], logits)
    # another training seed has other views: its own folder
    fit(distiller("kd", [source]), data, Recipe(epochs=1, batch_size=32, lr=0.05), seed=6, source_cache=again)
    assert (tmp_path / key / "seed6" / "epoch1.pt").exists() and len(forwards) == 1


# The bank of K views: an explicit approximation ----------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bank_logits_equal_a_fresh_forward_on_the_same_view(tmp_path: Path, dtype: str) -> None:
    split, model = cifar_like_split(), teacher()
    cache = build_cache(tmp_path, [("t", model)], "data", split, views=3, seed=7, dtype=dtype)
    assert cache.views == 3 and cache.fixed[0].shape == (3, len(split), 10)
    seen_views = set()
    for images, _labels, (cached,) in cache.batches(32, 1, 1):
        with torch.no_grad():
            fresh = torch.cat([model(image[None]) for image in images])  # one image at a time
        if dtype == "float32":
            torch.testing.assert_close(cached, fresh, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(cached, fresh.half().float(), rtol=0, atol=0)
        # each image is one of its stored views: matching view parameters reproduce it
        seen_views.add(images.sum().item())
    assert len(seen_views) > 1


def test_a_bank_shows_only_its_k_views_of_each_image(tmp_path: Path) -> None:
    split, model = cifar_like_split(), teacher()
    cache = build_cache(tmp_path, [("t", model)], "data", split, views=2, seed=3)
    bank = {tuple(split.transform.apply(split.images[i : i + 1], cache.view_params[v, i : i + 1]).flatten().tolist())
            for v in range(2) for i in range(4)}
    shown = set()
    for epoch in range(1, 7):
        order = epoch_draws(split, 0, epoch).order
        images = torch.cat([batch for batch, _, _ in cache.batches(32, 0, epoch)])
        shown |= {tuple(images[int((order == i).nonzero())].flatten().tolist()) for i in range(4)}
    assert shown <= bank  # six epochs, but never a view outside the bank


def test_without_augmentation_the_cache_is_exact_and_has_one_view(tmp_path: Path, digits: Dataset) -> None:
    model = build_model("convnet", 10, 1, {"width": 8, "depth": 1}).eval()
    for views in (None, 4):
        cache = build_cache(tmp_path, [("t", model)], "digits", digits.train, views=views, dtype="float32")
        assert cache.views == 1 and cache.view_params is None
    with torch.no_grad():
        fresh = model(digits.train.images)
    torch.testing.assert_close(cache.fixed[0][0], fresh, rtol=1e-6, atol=1e-6)
    assert len(list(tmp_path.rglob(CACHE_FILE))) == 1  # both requests share the exact cache


def test_logits_beyond_float16_are_cached_in_float32_not_as_infinities(tmp_path: Path, digits: Dataset) -> None:
    """A diverged teacher (an SFTN teacher after one epoch on digits gave 1e5) has finite logits
    that float16 cannot hold: the cache keeps them as they are instead of making the loss NaN."""
    model = build_model("convnet", 10, 1, {"width": 8, "depth": 1}).eval()
    with torch.no_grad():
        model.head.fc.weight.mul_(1e6)
        fresh = model(digits.train.images)
    assert fresh.isfinite().all() and fresh.abs().max() > torch.finfo(torch.float16).max
    cache = build_cache(tmp_path, [("diverged", model)], "digits", digits.train, dtype="float16")
    cached = cache.fixed[0][0]
    assert cached.dtype == torch.float32 and cached.isfinite().all()
    torch.testing.assert_close(cached, fresh, rtol=1e-6, atol=1e-6)
    small = build_cache(tmp_path, [("normal", build_model("convnet", 10, 1, {"width": 8, "depth": 1}).eval())],
                        "digits", digits.train, dtype="float16")
    assert small.fixed[0][0].dtype == torch.float16  # the setting holds wherever float16 can


def test_a_damaged_cache_file_is_computed_again(tmp_path: Path, digits: Dataset) -> None:
    """A truncated logits file is set aside and recomputed, not loaded by every later trial."""
    model = build_model("convnet", 10, 1, {"width": 8, "depth": 1}).eval()
    build_cache(tmp_path, [("t", model)], "digits", digits.train, dtype="float32")
    (stored,) = tmp_path.rglob(CACHE_FILE)
    stored.write_bytes(stored.read_bytes()[:100])
    cache = build_cache(tmp_path, [("t", model)], "digits", digits.train, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(cache.fixed[0][0], model(digits.train.images), rtol=1e-6, atol=1e-6)
    assert len(list(stored.parent.glob(f"{CACHE_FILE}.corrupt-*"))) == 1


def test_bank_views_are_replayed_not_redrawn(tmp_path: Path) -> None:
    split, model = cifar_like_split(), teacher()
    cache = build_cache(tmp_path, [("t", model)], "data", split, views=2, seed=3)
    first = load_or_build(tmp_path, "t", "data", model, split, views=2, seed=3)[1]
    assert torch.equal(cache.view_params, first)
    params = cache.view_params
    assert params.shape == (2, len(split), 3)
    assert params[..., :2].min() >= 0 and params[..., :2].max() <= 8  # crop offsets in the padded image
    assert set(params[..., 2].unique().tolist()) <= {0, 1}


def test_a_changed_source_dataset_or_view_bank_gives_another_cache() -> None:
    split = cifar_like_split()
    base = cache_key("teacher-a", "data-1", split, 4, 0, "float16")
    assert base == cache_key("teacher-a", "data-1", split, 4, 0, "float16")
    variants = {
        cache_key("teacher-b", "data-1", split, 4, 0, "float16"),
        cache_key("teacher-a", "data-2", split, 4, 0, "float16"),
        cache_key("teacher-a", "data-1", split, 2, 0, "float16"),
        cache_key("teacher-a", "data-1", split, 4, 1, "float16"),
        cache_key("teacher-a", "data-1", split, 4, 0, "float32"),
        cache_key("teacher-a", "data-1", cifar_like_split(64), 4, 0, "float16"),
        cache_key("teacher-a", "data-1", split, None, 0, "float16"),  # per epoch
    }
    assert base not in variants and len(variants) == 7
    # a per-epoch cache keeps every training seed in one key (a folder per seed); the bank seed is unused
    assert cache_key("teacher-a", "data-1", split, None, 0, "float16") == \
        cache_key("teacher-a", "data-1", split, None, 9, "float16")


def _fill(root: str, log: str, barrier) -> None:
    torch.set_num_threads(1)
    model = teacher()
    model.register_forward_hook(lambda *_: print("forward", file=Path(log).open("a")))
    barrier.wait()
    logits, _ = load_or_build(root, "t", "data", model, cifar_like_split(), views=2, seed=0)
    torch.save(logits.clone(), Path(root) / f"result-{multiprocessing.current_process().pid}.pt")


def test_two_processes_filling_one_cache_produce_one_valid_cache(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    log = tmp_path / "forwards.log"
    workers = [ctx.Process(target=_fill, args=(str(tmp_path), str(log), barrier)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    files = list(tmp_path.rglob(CACHE_FILE))
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp"))
    # one process computed it (2 views x 1 batch of 96 images), the other waited and read it
    assert log.read_text().count("forward") == 2
    a, b = (torch.load(p, weights_only=True) for p in sorted(tmp_path.glob("result-*.pt")))
    assert torch.equal(a, b)


def test_fit_with_an_exact_cache_runs_no_teacher_forward(tmp_path: Path, digits: Dataset) -> None:
    torch.manual_seed(0)
    source = build_model("convnet", 10, 1, {"width": 8, "depth": 1})
    student = build_model("convnet", 10, 1, {"width": 4, "depth": 1})
    distiller = DISTILLERS.get("kd")(student, [source], DISTILLERS.get("kd").make_params({"T": 4.0}))
    cache = build_cache(tmp_path, [("t", source)], "digits", digits.train, dtype="float32")
    calls = []
    source.register_forward_hook(lambda *_: calls.append(1))
    result = fit(distiller, digits, Recipe(epochs=2, batch_size=64, lr=0.05), source_cache=cache)
    assert calls == [] and result.metrics["train_loss_kd"] > 0


def test_only_methods_with_frozen_logit_sources_may_use_the_cache() -> None:
    cacheable = {name for name in DISTILLERS.names() if DISTILLERS.get(name).can_cache_sources()}
    assert {"kd", "takd", "dgkd", "sftn"} <= cacheable  # sftn: stage 2, from the frozen SFTN teacher
    # the teacher (or what is distilled from) changes during training, or features are read
    assert not cacheable & {"sokd", "sftn_teacher", "dml", "simkd"}


def test_trials_use_the_cache_only_where_the_method_and_spec_allow(tmp_path: Path, digits: Dataset,
                                                                   spec_dict: dict) -> None:
    from kd_core.stages import StageRecord, StageSpec
    from sweeps.pipeline import Source, SweepContext, fit_options
    from sweeps.spec import SweepSpec

    torch.manual_seed(0)
    source_model = build_model("convnet", 10, 1, {"width": 8, "depth": 1})
    stage = StageSpec("teacher", {"name": "convnet"}, {"name": "digits"}, {})
    sources = [Source(stage, StageRecord("teacher-key", tmp_path, {}), source_model)]

    def options(method: str, enabled: bool = True) -> dict:
        spec = SweepSpec.model_validate({**spec_dict, "sweep": {"teacher_cache": {"enabled": enabled}}})
        context = SweepContext("s", spec, str(tmp_path), "sqlite:///unused.db", "p")
        student = build_model("convnet", 10, 1, {"width": 4, "depth": 1})
        distiller = DISTILLERS.get(method)(student, [source_model], DISTILLERS.get(method).make_params({}))
        return fit_options(context, distiller, sources, digits, spec.data.model_dump())

    assert options("kd")["source_cache"] is not None
    assert options("kd", enabled=False)["source_cache"] is None
    assert options("sokd")["source_cache"] is None  # its bridge on the teacher trunk trains online
    assert options("simkd")["source_cache"] is None  # reads teacher feature maps


def test_the_spec_default_is_one_view_per_image_per_epoch(spec_dict: dict) -> None:
    from sweeps.spec import SweepSpec

    settings = SweepSpec.model_validate(spec_dict).sweep.teacher_cache
    assert settings.enabled and settings.views is None
    bank = SweepSpec.model_validate({**spec_dict, "sweep": {"teacher_cache": {"views": 4}}}).sweep.teacher_cache
    assert bank.views == 4
    with pytest.raises(ValueError, match="views"):
        SweepSpec.model_validate({**spec_dict, "sweep": {"teacher_cache": {"views": 0}}})
