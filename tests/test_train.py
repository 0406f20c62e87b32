from __future__ import annotations

import math
import pickle

import pytest
import torch

from kd_core.distillers import DISTILLERS, START, Distiller, TrainingPosition
from kd_core.distillers.ce import CEDistiller
from kd_core.models import build_model
from kd_core.recipes import build_recipe
from kd_core.train import EpochReport, NonFiniteLossError, fit, load_checkpoint


def ce_distiller(seed: int = 0) -> Distiller:
    torch.manual_seed(seed)
    ce = DISTILLERS.get("ce")
    return ce(build_model("convnet", 10, 1, {"width": 4}), [], ce.make_params())


def test_fit_learns_and_reports_every_epoch(digits) -> None:
    reports: list[EpochReport] = []
    result = fit(ce_distiller(), digits, build_recipe("digits", {"epochs": 3}), callback=reports.append)
    assert [r.epoch for r in reports] == [1, 2, 3]
    assert [r.is_last for r in reports] == [False, False, True]
    assert {"train_loss", "train_loss_ce", "train_acc", "val_loss", "val_acc", "val_acc_best",
            "best_epoch", "lr"} <= set(reports[0].metrics)
    assert "test_acc" not in reports[0].metrics  # test is for the final report only
    assert {"test_acc", "test_acc_last"} <= set(reports[-1].metrics)
    assert result.metrics["val_acc_best"] > 0.8  # chance is 0.1
    assert result.metrics["val_acc_best"] == max(r.metrics["val_acc"] for r in reports)
    assert 1 <= result.best_epoch <= 3


def test_resume_from_checkpoint_matches_an_uninterrupted_run(digits, tmp_path) -> None:
    recipe = build_recipe("digits", {"epochs": 4})
    straight = ce_distiller()
    fit(straight, digits, recipe, seed=3)

    first = ce_distiller()

    def save_at_two(report: EpochReport) -> None:
        if report.epoch == 2:
            report.save(tmp_path)
            raise KeyboardInterrupt  # the process dies after epoch 2

    with pytest.raises(KeyboardInterrupt):
        fit(first, digits, recipe, seed=3, callback=save_at_two)
    resumed = ce_distiller(seed=99)  # different init: everything must come from the checkpoint
    result = fit(resumed, digits, recipe, seed=3, resume=load_checkpoint(tmp_path))
    assert result.epochs_run == 2
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


class Opaque:
    """Any non-tensor object: a checkpoint must never unpickle it."""


def test_checkpoints_load_without_unpickling_objects(tmp_path) -> None:
    torch.save({"epoch": 1, "payload": Opaque()}, tmp_path / "train_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path)


class NaNDistiller(Distiller):
    def forward_train(self, images, labels, position=START):
        logits = self.student(images)
        return logits, {"ce": logits.sum() * float("nan")}


def test_non_finite_loss_stops_training(digits) -> None:
    model = build_model("convnet", 10, 1, {"width": 4})
    distiller = NaNDistiller(model, [], DISTILLERS.get("ce").make_params())
    with pytest.raises(NonFiniteLossError, match="nan"):
        fit(distiller, digits, build_recipe("digits", {"epochs": 2}))


def test_recipe_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        build_recipe("digits", {"epochs": 0})
    with pytest.raises(ValueError, match="unknown recipe field 'epoch'"):
        build_recipe("digits", {"epoch": 3})
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        build_recipe("fast")


class Recording(CEDistiller):
    """CE that records the position of every step."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.positions: list[TrainingPosition] = []

    def forward_train(self, images, labels, position=START):
        self.positions.append(position)
        return super().forward_train(images, labels, position)


def recording(seed: int = 0) -> Recording:
    torch.manual_seed(seed)
    return Recording(build_model("convnet", 10, 1, {"width": 4}), [], DISTILLERS.get("ce").make_params())


def test_fit_passes_the_training_position_on_every_step(digits, tmp_path) -> None:
    recipe = build_recipe("digits", {"epochs": 3})
    steps = math.ceil(len(digits.train) / recipe.batch_size)  # the last partial batch counts
    distiller = recording()

    def stop_after_two(report: EpochReport) -> None:
        if report.epoch == 2:
            report.save(tmp_path)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(distiller, digits, recipe, callback=stop_after_two)
    positions = distiller.positions
    assert [p.step for p in positions] == list(range(2 * steps))  # one position per optimizer step
    assert [p.epoch for p in positions] == [1] * steps + [2] * steps
    assert {(p.steps_per_epoch, p.epochs, p.total_steps) for p in positions} == {(steps, 3, 3 * steps)}
    assert positions[0] == TrainingPosition(epoch=1, step=0, steps_per_epoch=steps, epochs=3)
    assert positions[0].progress == 0.0
    assert [p.progress for p in positions] == sorted(p.progress for p in positions)
    # A resumed run carries on from the checkpoint's epoch, not from step 0.
    resumed = recording(seed=1)
    fit(resumed, digits, recipe, resume=load_checkpoint(tmp_path))
    assert [p.step for p in resumed.positions] == list(range(2 * steps, 3 * steps))
    assert {p.epoch for p in resumed.positions} == {3}
    assert resumed.positions[-1].progress == pytest.approx(1 - 1 / (3 * steps))


def test_training_position_validates_and_defaults() -> None:
    assert START == TrainingPosition(epoch=1, step=0, steps_per_epoch=1, epochs=1)
    assert TrainingPosition(epoch=2, step=15, steps_per_epoch=10, epochs=3).progress == 0.5
    with pytest.raises(ValueError, match="invalid training position"):
        TrainingPosition(epoch=0, step=0, steps_per_epoch=1, epochs=1)
