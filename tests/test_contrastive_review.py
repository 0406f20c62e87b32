"""CRD and ReviewKD: their losses against hand computations from the papers' formulas, CRD's
memory bank update, exact resume (the banks and Z restored), and the sample-index path of `fit`
that CRD needs (with and without the teacher-output cache; refused for a split without indices)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kd_core.cache import build_cache, epoch_draws
from kd_core.data.augment import CropFlipNormalize, Normalize
from kd_core.data.base import Dataset, Split
from kd_core.distillers import DISTILLERS, START, Distiller, TrainingPosition
from kd_core.distillers.crd import momentum_update, nce_loss, sample_negatives
from kd_core.distillers.kd import KDDistiller
from kd_core.distillers.reviewkd import hcl
from kd_core.models import build_model
from kd_core.recipes import Recipe, build_recipe
from kd_core.train import EpochReport, fit, load_checkpoint


def distiller(method: str, student_seed: int = 0, params: dict | None = None, channels: int = 1) -> Distiller:
    """`method` on a convnet pair: the teacher always the same (sources are not checkpointed),
    the student initialised from `student_seed`."""
    torch.manual_seed(100)
    teacher = build_model("convnet", 10, channels, {"width": 8, "depth": 1})
    torch.manual_seed(student_seed)
    student = build_model("convnet", 10, channels, {"width": 4, "depth": 1})
    cls = DISTILLERS.get(method)
    return cls(student, [teacher], cls.make_params(params or {}))


# CRD: the NCE loss, the bank update, the whole term ----------------------------------------------


def test_nce_loss_equals_the_paper_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(3, 6, generator=generator) * 0.5  # B = 3, K = 5 negatives
    num_data = 20
    k, noise = 5, 5 / num_data  # K * Pn, Pn = 1 / N
    expected = 0.0
    for row in probabilities.double().tolist():
        expected += math.log(row[0] / (row[0] + noise))  # log h(positive)
        expected += sum(math.log(1 - p / (p + noise)) for p in row[1:])  # log (1 - h(negative))
    expected = -expected / 3
    assert len(probabilities[0]) - 1 == k
    assert nce_loss(probabilities, num_data).item() == pytest.approx(expected, abs=1e-5)


def test_the_memory_bank_moves_the_batch_rows_and_renormalises_them() -> None:
    generator = torch.Generator().manual_seed(1)
    memory = torch.randn(6, 4, generator=generator)
    before = memory.clone()
    index = torch.tensor([4, 1])
    embeddings = torch.nn.functional.normalize(torch.randn(2, 4, generator=generator), dim=1)
    updated = momentum_update(memory, index, embeddings, 0.5)
    for row in range(6):
        if row in (4, 1):
            i = [4, 1].index(row)
            mixed = [0.5 * m + 0.5 * e for m, e in zip(before[row].tolist(), embeddings[i].tolist(), strict=True)]
            norm = math.sqrt(sum(v * v for v in mixed))
            torch.testing.assert_close(updated[row], torch.tensor([v / norm for v in mixed]), rtol=0, atol=1e-6)
        else:
            assert torch.equal(updated[row], before[row])
    assert torch.equal(memory, before)  # out of place: the step's graph still reads the old bank


def test_negatives_are_distinct_images_of_other_classes() -> None:
    labels = torch.arange(40) % 4
    index = torch.tensor([0, 5, 10, 39])
    negatives = sample_negatives(labels, index, 30, torch.Generator().manual_seed(0))
    assert negatives.shape == (4, 30)
    for row, i in zip(negatives, index, strict=True):
        assert len(set(row.tolist())) == 30
        assert not (labels[row] == labels[i]).any()


def test_the_crd_term_equals_an_independent_computation() -> None:
    """With negatives = every image of another class (nce_k clamped to the pool), the term is
    a function of the banks and embeddings alone, whatever the draw."""
    crd = distiller("crd")
    train_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    crd.bind_training_set(train_labels)
    assert crd.num_negatives == 4  # min(16384, 6 - 2): the clamp to the other-class pool
    crd.sample_index = index = torch.tensor([0, 2, 5])
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    memory_s, memory_t = crd.memory_s.clone(), crd.memory_t.clone()
    crd.train()
    _, terms = crd.forward_train(images, train_labels[index])

    with torch.no_grad():  # the embeddings by hand: pool, linear, divide by the norm
        def embed(feature_map: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
            v = feature_map.mean(dim=(2, 3)) @ linear.weight.T + linear.bias
            return v / v.norm(dim=1, keepdim=True)

        v_s = embed(crd.student.prehead(images), crd.embed_s.linear)  # train mode: batch statistics again
        v_t = embed(crd.sources[0].prehead(images), crd.embed_t.linear)
    n, k, t = 6, 4, 0.07

    def scores(anchors: torch.Tensor, memory: torch.Tensor) -> list[list[float]]:
        rows = []
        for anchor, i in zip(anchors.double(), index.tolist(), strict=True):
            rows.append([math.exp(float(anchor @ memory[j].double()) / t)
                         for j in [i] + [j for j in range(n) if train_labels[j] != train_labels[i]]])
        return rows

    def loss(rows: list[list[float]], z: float) -> float:
        total = 0.0
        for row in rows:
            p = [s / z for s in row]
            total += math.log(p[0] / (p[0] + k / n)) + sum(math.log((k / n) / (q + k / n)) for q in p[1:])
        return -total / len(rows)

    student_anchored, teacher_anchored = scores(v_s, memory_t), scores(v_t, memory_s)
    z_s = sum(map(sum, student_anchored)) / (3 * (k + 1)) * n  # mean over the first batch, times N
    z_t = sum(map(sum, teacher_anchored)) / (3 * (k + 1)) * n
    expected = loss(student_anchored, z_s) + loss(teacher_anchored, z_t)
    assert terms["crd"].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(crd.nce_z, torch.tensor([z_s, z_t], dtype=torch.float32), rtol=1e-5, atol=0)
    # the banks: the batch's rows moved halfway to the embeddings and renormalised, the rest kept
    for bank, old, v in ((crd.memory_s, memory_s, v_s), (crd.memory_t, memory_t, v_t)):
        mixed = 0.5 * old[index] + 0.5 * v
        torch.testing.assert_close(bank[index], mixed / mixed.norm(dim=1, keepdim=True), rtol=0, atol=1e-6)
        kept = [1, 3, 4]
        assert torch.equal(bank[kept], old[kept])
    # Z is kept after the first batch
    z = crd.nce_z.clone()
    crd.sample_index = torch.tensor([1, 3])
    crd.forward_train(images[:2], train_labels[[1, 3]])
    assert torch.equal(crd.nce_z, z)


def test_crd_needs_its_training_set_and_valid_params() -> None:
    crd = distiller("crd")
    with pytest.raises(RuntimeError, match="needs bind_training_set"):
        crd.forward_train(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least two classes"):
        crd.bind_training_set(torch.zeros(5, dtype=torch.long))
    for values, message in [({"nce_t": 0.0}, "nce_t must be > 0"), ({"nce_m": 1.0}, "nce_m must lie in"),
                            ({"nce_k": 0}, "nce_k must be >= 1"), ({"feat_dim": 0}, "feat_dim must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            DISTILLERS.get("crd").make_params(values)


# ReviewKD: HCL, the warm-up, the stage rule ---------------------------------------------------


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling of (N, C, H, W) to size x size for H, W divisible by size, by reshaping."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


def test_hcl_equals_the_paper_formula() -> None:
    generator = torch.Generator().manual_seed(3)
    sizes = (8, 4, 1)
    student = [torch.randn(2, 3, s, s, generator=generator) for s in sizes]
    teacher = [torch.randn(2, 3, s, s, generator=generator) for s in sizes]

    def mse(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a.double() - b.double()) ** 2).sum()) / a.numel()

    # 8x8: full map weight 1, then 4x4, 2x2, 1x1 weights 1/2, 1/4, 1/8; 4x4: 2x2 and 1x1 only
    # (a pooling size not below the map is skipped and does not halve the weight); 1x1: full only.
    expected = (mse(student[0], teacher[0]) + 0.5 * mse(_pool(student[0], 4), _pool(teacher[0], 4))
                + 0.25 * mse(_pool(student[0], 2), _pool(teacher[0], 2))
                + 0.125 * mse(_pool(student[0], 1), _pool(teacher[0], 1))) / 1.875
    expected += (mse(student[1], teacher[1]) + 0.5 * mse(_pool(student[1], 2), _pool(teacher[1], 2))
                 + 0.25 * mse(_pool(student[1], 1), _pool(teacher[1], 1))) / 1.75
    expected += mse(student[2], teacher[2])
    assert hcl(student, teacher).item() == pytest.approx(expected, abs=1e-5)


def test_the_review_term_warms_up_over_the_first_epochs() -> None:
    review = distiller("reviewkd").train()
    images, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.arange(4)

    def term(epoch: int) -> float:
        return review.forward_train(images, labels, TrainingPosition(epoch, 0, 1, 240))[1]["review"].item()

    full = term(20)
    assert full > 0
    assert term(1) == pytest.approx(full / 20, rel=1e-5)
    assert term(10) == pytest.approx(full / 2, rel=1e-5)
    assert term(200) == pytest.approx(full, rel=1e-5)
    no_ramp = distiller("reviewkd", params={"warmup_epochs": 0}).train()
    assert no_ramp.forward_train(images, labels, START)[1]["review"].item() == pytest.approx(full, rel=1e-5)


def test_reviewkd_reviews_the_deepest_shared_stages() -> None:
    review = distiller("reviewkd")
    assert review.num_stages == 3 and len(review.abfs) == 4  # 3 stages + the pooled feature
    assert [abf.attention is not None for abf in review.abfs] == [True, True, True, False]
    assert review.abfs[-1].conv1[0].out_channels == 16  # min(512, the student's 16 pooled channels)
    assert len(distiller("reviewkd", params={"num_stages": 1}).abfs) == 2
    with pytest.raises(ValueError, match="num_stages 4 exceeds the stages both networks have"):
        distiller("reviewkd", params={"num_stages": 4})
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        DISTILLERS.get("reviewkd").make_params({"warmup_epochs": -1})


# fit: resume, the sample index, a split without indices ---------------------------------------


@pytest.mark.parametrize("method", ["crd", "reviewkd"])
def test_resume_restores_everything_exactly(method: str, digits: Dataset, tmp_path: Path) -> None:
    recipe = build_recipe("digits", {"epochs": 2})
    straight = distiller(method)
    fit(straight, digits, recipe, seed=3)

    def save_at_one(report: EpochReport) -> None:
        report.save(tmp_path)
        raise KeyboardInterrupt  # the process dies after epoch 1

    with pytest.raises(KeyboardInterrupt):
        fit(distiller(method), digits, recipe, seed=3, callback=save_at_one)
    resumed = distiller(method, student_seed=99)  # everything trained must come from the checkpoint
    assert fit(resumed, digits, recipe, seed=3, resume=load_checkpoint(tmp_path)).epochs_run == 1
    state = straight.state_dict()
    if method == "crd":
        assert {"memory_s", "memory_t", "nce_z"} <= set(load_checkpoint(tmp_path)["model"])
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_fit_gives_crd_each_image_index_once_an_epoch(digits: Dataset) -> None:
    crd = distiller("crd")
    fit(crd, digits, build_recipe("digits", {"epochs": 1}))
    assert crd.memory_s.shape == (len(digits.train), 128)
    # the banks start with rows of norm near 1, not 1: every row updated once is renormalised
    for bank in (crd.memory_s, crd.memory_t):
        torch.testing.assert_close(bank.norm(dim=1), torch.ones(len(digits.train)), rtol=0, atol=1e-5)
    assert crd.sample_index is None  # cleared after the epoch, as the cached logits are


class IndexedKD(KDDistiller):
    """KD that reads sample indices: records each step's indices, labels and cached logits."""

    needs_sample_index = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.bound: torch.Tensor | None = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def bind_training_set(self, labels: torch.Tensor) -> None:
        self.bound = labels.clone()

    def forward_train(self, images, labels, position=START):
        self.steps.append((self.sample_index.clone(), labels.clone(), self.cached_source_logits is not None))
        return super().forward_train(images, labels, position)


def cifar_like_data(n: int = 80) -> Dataset:
    g = torch.Generator().manual_seed(0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train = Split(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g), CropFlipNormalize(4, True, mean=mean, std=std))
    held_out = Split(torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (16,), generator=g), Normalize(mean, std))
    return Dataset("cifar_like", train, held_out, held_out, num_classes=10, in_channels=3)


@pytest.mark.parametrize("cached", [False, True])
def test_the_sample_index_reaches_the_distiller(cached: bool, tmp_path: Path) -> None:
    data = cifar_like_data()
    torch.manual_seed(0)
    teacher = build_model("convnet", 10, 3, {"width": 8, "depth": 1}).eval()
    student = build_model("convnet", 10, 3, {"width": 4, "depth": 1})
    model = IndexedKD(student, [teacher], KDDistiller.make_params({}))
    cache = build_cache(tmp_path, [("t", teacher)], "data", data.train, dtype="float32") if cached else None
    fit(model, data, Recipe(epochs=2, batch_size=32, lr=0.05), seed=5, source_cache=cache)
    assert torch.equal(model.bound, data.train.labels)
    assert len(model.steps) == 2 * 3  # 80 images, batch 32
    assert all(used_cache == cached for _, _, used_cache in model.steps)
    for epoch in (1, 2):
        steps = model.steps[3 * (epoch - 1): 3 * epoch]
        index = torch.cat([index for index, _, _ in steps])
        assert index.dtype == torch.int64
        assert torch.equal(index, epoch_draws(data.train, 5, epoch).order)  # the epoch's order, batch by batch
        assert torch.equal(torch.cat([labels for _, labels, _ in steps]), data.train.labels[index])


class LoaderSplit:
    """A split that batches on its own, like a DataLoader-backed image folder: no indices."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator:
        return self.split.batches(batch_size, generator)

    def to(self, device: torch.device | str) -> LoaderSplit:
        return LoaderSplit(self.split.to(device))


def test_a_split_without_indices_is_refused_before_training(digits: Dataset) -> None:
    data = Dataset("loader", LoaderSplit(digits.train), digits.val, digits.test, 10, 1)
    crd = distiller("crd")
    before = {k: v.clone() for k, v in crd.student.state_dict().items()}
    with pytest.raises(ValueError, match=r"method 'crd' \(CRDDistiller\) needs each training image's dataset "
                                         r"index \(needs_sample_index\), but the training split \(LoaderSplit\)"):
        fit(crd, data, build_recipe("digits", {"epochs": 1}))
    assert all(torch.equal(v, before[k]) for k, v in crd.student.state_dict().items())
