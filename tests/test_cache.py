"""The teacher-output cache: cached logits equal a fresh forward on the same view, keys
separate what differs, concurrent fillers produce one valid cache, and methods whose
teacher changes never use it."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from kd_core.cache import CACHE_FILE, build_cache, cache_key, load_or_build
from kd_core.data.augment import CropFlipNormalize
from kd_core.data.base import Dataset, Split
from kd_core.distillers import DISTILLERS
from kd_core.models import build_model
from kd_core.recipes import Recipe
from kd_core.train import fit

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def cifar_like_split(n: int = 96, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Split(images, labels, CropFlipNormalize(4, True, mean=MEAN, std=STD))


def teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("convnet", 10, 3, {"width": 8, "depth": 1}).eval()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_logits_equal_a_fresh_forward_on_the_same_view(tmp_path: Path, dtype: str) -> None:
    split, model = cifar_like_split(), teacher()
    cache = build_cache(tmp_path, [("t", model)], "data", split, views=3, seed=7, dtype=dtype)
    assert cache.views == 3 and cache.logits[0].shape == (3, len(split), 10)
    seen_views = set()
    for images, _labels, (cached,) in cache.batches(split, 32, torch.Generator().manual_seed(1)):
        with torch.no_grad():
            fresh = torch.cat([model(image[None]) for image in images])  # one image at a time
        if dtype == "float32":
            torch.testing.assert_close(cached, fresh, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(cached, fresh.half().float(), rtol=0, atol=0)
        # each image is one of its stored views: matching view parameters reproduce it
        seen_views.add(images.sum().item())
    assert len(seen_views) > 1


def test_without_augmentation_the_cache_is_exact_and_has_one_view(tmp_path: Path, digits: Dataset) -> None:
    model = build_model("convnet", 10, 1, {"width": 8, "depth": 1}).eval()
    cache = build_cache(tmp_path, [("t", model)], "digits", digits.train, views=4, dtype="float32")
    assert cache.views == 1 and cache.view_params is None
    with torch.no_grad():
        fresh = model(digits.train.images)
    torch.testing.assert_close(cache.logits[0][0], fresh, rtol=1e-6, atol=1e-6)


def test_views_are_replayed_not_redrawn(tmp_path: Path) -> None:
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
    }
    assert base not in variants and len(variants) == 6


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


def test_fit_with_the_cache_runs_no_teacher_forward(tmp_path: Path, digits: Dataset) -> None:
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
