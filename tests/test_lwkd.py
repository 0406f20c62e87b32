"""LW-KD, its synthetic data and the teacher-free KD baseline (docs/methods.md, lwkd and tfkd)."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

from kd_core.data import DATASETS
from kd_core.data.synthetic import synthetic_images
from kd_core.distillers import DISTILLERS
from kd_core.distillers.lwkd import BANK_SEED
from kd_core.models import build_model
from kd_core.recipes import build_recipe
from kd_core.stages import SourcePlan
from kd_core.train import EpochReport, fit

LWKD = DISTILLERS.get("lwkd")
TFKD = DISTILLERS.get("tfkd")


def small(width: int, num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("convnet", num_classes, 1, {"width": width, "depth": 1})


def plan(num_classes: int = 10, seed: int = 0) -> SourcePlan:
    return SourcePlan(teacher=None, assistants=(), student_arch={"name": "convnet", "args": {"width": 4, "depth": 1}},
                      data={"name": "digits"}, recipe=build_recipe("digits", {"epochs": 3}).as_dict(),
                      seed=seed, num_classes=num_classes, input_shape=(1, 8, 8))


# Plain-Python reference formulas (the canonical KD_T of docs/spec.md#methods).

def softmax(row: list[float], T: float = 1.0) -> list[float]:
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def ce_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> float:
    rows, ys = logits.tolist(), labels.tolist()
    return sum(-math.log(softmax(row)[y]) for row, y in zip(rows, ys)) / len(ys)


def kd_by_hand(student: list[list[float]], teacher: list[list[float]], T: float) -> float:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, averaged over the batch."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p, q = softmax(s_row, T), softmax(t_row, T)
        total += sum(qc * (math.log(qc) - math.log(pc)) for qc, pc in zip(q, p) if qc > 0)
    return T**2 * total / len(student)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Synthetic shapes.

@pytest.mark.parametrize("num_classes", [10, 100])
def test_synthetic_shapes_splits_and_normalisation(num_classes: int) -> None:
    data = DATASETS.get("synthetic_shapes")(num_classes=num_classes, image_size=16, channels=3, samples_per_class=10)
    assert (data.num_classes, data.in_channels) == (num_classes, 3)
    splits = [data.train, data.val, data.test]
    assert sum(len(s) for s in splits) == num_classes * 10
    labels = torch.cat([s.labels for s in splits])
    assert torch.equal(labels.bincount(minlength=num_classes), torch.full((num_classes,), 10))
    images = torch.cat([s.images for s in splits])
    assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05


def test_synthetic_images_are_deterministic_by_seed() -> None:
    images, labels = synthetic_images(10, 8, 1, 5, seed=3)
    again, again_labels = synthetic_images(10, 8, 1, 5, seed=3)
    other, other_labels = synthetic_images(10, 8, 1, 5, seed=4)
    assert images.shape == (50, 1, 8, 8) and torch.equal(labels, torch.arange(10).repeat_interleave(5))
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.allclose(images, other) and torch.equal(labels, other_labels)
    data = DATASETS.get("synthetic_shapes")(num_classes=10, image_size=8, channels=1, samples_per_class=5, seed=3)
    assert torch.equal(data.test.images, DATASETS.get("synthetic_shapes")(
        num_classes=10, image_size=8, channels=1, samples_per_class=5, seed=3).test.images)


@pytest.mark.parametrize(("num_classes", "image_size", "channels"), [(10, 8, 1), (100, 8, 1), (100, 16, 3)])
def test_synthetic_classes_differ_and_look_alike_across_seeds(num_classes: int, image_size: int, channels: int) -> None:
    images, labels = synthetic_images(num_classes, image_size, channels, 10, seed=0)
    means = torch.stack([images[labels == c].mean(0) for c in range(num_classes)]).flatten(1)
    distances = torch.cdist(means, means) + torch.eye(num_classes) * 1e9
    assert distances.min() > 1.0  # every pair of class-mean images is clearly apart
    # Another seed's samples sit nearest their own class's mean (LW-KD's bank relies on it).
    fresh, fresh_labels = synthetic_images(num_classes, image_size, channels, 10, seed=1)
    nearest = torch.cdist(fresh.flatten(1), means).argmin(1)
    assert (nearest == fresh_labels).float().mean() > 0.9


def test_a_tiny_convnet_learns_synthetic_shapes() -> None:
    data = DATASETS.get("synthetic_shapes")(num_classes=10, image_size=8, channels=1, samples_per_class=40)
    ce = DISTILLERS.get("ce")
    result = fit(ce(small(4), [], ce.make_params()), data, build_recipe("digits", {"epochs": 4}))
    assert result.metrics["val_acc_best"] > 0.5  # chance is 0.1


# LW-KD.

def test_lwkd_source_stage_is_a_ce_teacher_on_synthetic_data() -> None:
    params = LWKD.make_params({"synthetic_per_class": 20, "lw_epochs": 2})
    for num_classes in (10, 100):
        (stage,) = LWKD.source_stages(params, plan(num_classes, seed=3))
        assert stage.role == "lw_teacher" and stage.parents == ()
        assert stage.method == {"name": "ce", "params": {}}
        assert stage.arch == {"name": "convnet", "args": {"width": 8, "depth": 1}}
        assert stage.recipe["epochs"] == 2 and stage.recipe["lr"] == plan().recipe["lr"]
        assert stage.seed == 3
        factory = DATASETS.get(stage.data["name"])
        args = {k: v for k, v in stage.data.items() if k != "name"}
        # Every factory argument is spelled out (one stage key per setting), with the defaults.
        assert set(args) == set(inspect.signature(factory).parameters)
        assert args["val_fraction"] == inspect.signature(factory).parameters["val_fraction"].default
        assert (args["num_classes"], args["channels"], args["image_size"]) == (num_classes, 1, 8)
        assert (args["samples_per_class"], args["seed"]) == (20, 3)
    data = DATASETS.get("synthetic_shapes")(**args)
    assert data.num_classes == 100 and data.train.images.shape[1:] == (1, 8, 8)
    assert TFKD.source_stages(TFKD.make_params(), plan()) == []


def test_lwkd_bank_holds_teacher_logits_on_unseen_synthetic_images() -> None:
    teacher = small(4, seed=1)
    before = copy.deepcopy(teacher.state_dict())
    distiller = LWKD(small(4), [teacher], LWKD.make_params({"bank_size": 3}))
    distiller.train()
    distiller.forward_train(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    assert distiller.bank.shape == (10, 3, 10)
    images, _ = synthetic_images(10, 8, 1, 3, BANK_SEED)
    with torch.no_grad():
        expected = teacher(images).reshape(10, 3, 10)
    torch.testing.assert_close(distiller.bank, expected)
    for key, value in before.items():  # eval mode: BN buffers untouched
        torch.testing.assert_close(teacher.state_dict()[key], value, rtol=0, atol=0)
    assert "bank" not in distiller.state_dict()  # rebuilt from the teacher, never checkpointed


def test_lwkd_draws_from_the_labels_class() -> None:
    distiller = LWKD(small(4, num_classes=3), [small(4, num_classes=3, seed=1)], LWKD.make_params({"bank_size": 2}))
    distiller.bank = torch.arange(3 * 2 * 3, dtype=torch.float32).reshape(3, 2, 3)
    labels = torch.tensor([0, 1, 2] * 20)
    torch.manual_seed(0)
    drawn = distiller.draw_soft_targets(labels)
    for row, y in zip(drawn, labels):
        assert any(torch.equal(row, entry) for entry in distiller.bank[y])
    assert len({tuple(row.tolist()) for row in drawn[labels == 0]}) == 2  # both entries get drawn


@pytest.mark.parametrize("conditional", [True, False])
def test_lwkd_terms_match_the_formulas(conditional: bool) -> None:
    T, num_classes = 2.0, 4
    params = LWKD.make_params({"T": T, "bank_size": 1, "disc_conditional": conditional, "disc_hidden": 5})
    distiller = LWKD(small(4, num_classes), [small(4, num_classes, seed=1)], params)
    bank = torch.tensor([[1.0, -1.0, 0.0, 0.5], [0.0, 2.0, -1.0, 0.0], [0.3, 0.3, 3.0, -2.0], [-1.0, 0.0, 0.0, 1.0]])
    distiller.bank = bank.unsqueeze(1)  # one entry per class: the draw is exact
    images, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    assert set(terms) == {"ce", "kd", "adv"}
    assert distiller.weights == {"ce": 0.1, "kd": 0.9, "adv": 0.1}
    z = logits.detach()
    assert terms["ce"].item() == pytest.approx(ce_by_hand(z, labels), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kd_by_hand(z.tolist(), bank[labels].tolist(), T), rel=1e-5)

    def discriminator_by_hand(probs: torch.Tensor) -> list[float]:
        """D's MLP written out: Linear, LeakyReLU(0.2), Linear on [p, one_hot(y)] (or p)."""
        first, second = distiller.discriminator.net[0], distiller.discriminator.net[2]
        outputs = []
        for row, y in zip(probs.tolist(), labels.tolist()):
            x = row + ([float(c == y) for c in range(num_classes)] if conditional else [])
            hidden = [sum(w * v for w, v in zip(ws, x)) + b for ws, b in zip(first.weight.tolist(), first.bias.tolist())]
            hidden = [h if h > 0 else 0.2 * h for h in hidden]
            outputs.append(sum(w * h for w, h in zip(second.weight[0].tolist(), hidden)) + second.bias.item())
        return outputs

    p_student = torch.tensor([softmax(row, T) for row in z.tolist()])
    d_student = discriminator_by_hand(p_student)
    torch.testing.assert_close(distiller.discriminator(p_student, labels).detach(), torch.tensor(d_student))
    expected_adv = sum(-log_sigmoid(d) for d in d_student) / len(d_student)
    assert terms["adv"].item() == pytest.approx(expected_adv, rel=1e-5)

    # D's loss, -log D(q) - log(1 - D(p_s)), is reported before D's step.
    d_teacher = discriminator_by_hand(torch.tensor([softmax(row, T) for row in bank[labels].tolist()]))
    expected_disc = (sum(-log_sigmoid(d) for d in d_teacher) + sum(-log_sigmoid(-d) for d in d_student)) / len(labels)
    metrics = distiller.after_step(images, labels, z)
    assert set(metrics) == {"disc_loss"}
    assert metrics["disc_loss"] == pytest.approx(expected_disc, rel=1e-5)


def test_lwkd_gradients_reach_the_student_only_and_d_steps_only_in_after_step() -> None:
    student, teacher = small(4), small(8, seed=1)
    teacher_before = copy.deepcopy(teacher.state_dict())
    distiller = LWKD(student, [teacher], LWKD.make_params())
    distiller.train()
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    logits, terms = distiller.forward_train(images, labels)
    for name, term in terms.items():
        student.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        assert all(p.grad is not None for p in student.parameters()), name
        assert sum(p.grad.abs().sum() for p in student.parameters()) > 0, name
    assert all(p.grad is None for p in teacher.parameters())

    # The trainer's optimizer holds the student only: its step leaves D alone.
    optimizer = torch.optim.SGD(distiller.param_groups()[0]["params"], lr=0.1)
    disc_ids = {id(p) for p in distiller.discriminator.parameters()}
    assert not disc_ids & {id(p) for group in distiller.param_groups() for p in group["params"]}
    disc_before = copy.deepcopy(distiller.discriminator.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    optimizer.zero_grad()
    sum(distiller.weights[name] * term for name, term in terms.items()).backward()
    assert any(p.grad is not None for p in distiller.discriminator.parameters())  # reached D, unused
    optimizer.step()
    for key, value in disc_before.items():
        assert torch.equal(distiller.discriminator.state_dict()[key], value)
    student_stepped = copy.deepcopy(student.state_dict())
    assert any(not torch.equal(student_stepped[k], v) for k, v in student_before.items())

    distiller.after_step(images, labels, logits.detach())
    assert all(not torch.equal(distiller.discriminator.state_dict()[k], v) for k, v in disc_before.items())
    for key, value in student_stepped.items():  # D's step leaves the student alone
        assert torch.equal(student.state_dict()[key], value)
    for key, value in teacher_before.items():
        assert torch.equal(teacher.state_dict()[key], value)


def test_lwkd_d_step_ignores_gradients_the_student_loss_left_on_d() -> None:
    distiller = LWKD(small(4), [small(4, seed=1)], LWKD.make_params())
    distiller.train()
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    logits, terms = distiller.forward_train(images, labels)
    twin = copy.deepcopy(distiller)
    assert twin.disc_optimizer.param_groups[0]["params"][0] is twin.discriminator.net[0].weight
    terms["adv"].backward()  # the student's backward leaves gradients on D
    for model in (distiller, twin):
        torch.manual_seed(5)  # the same fresh draw of q
        model.after_step(images, labels, logits.detach())
    for key, value in twin.discriminator.state_dict().items():
        torch.testing.assert_close(distiller.discriminator.state_dict()[key], value)


def test_lwkd_params_are_checked() -> None:
    for bad in ({"bank_size": 0}, {"disc_lr": 0.0}, {"T": 0.0}, {"w_adv": -1.0}, {"lw_arch": {"args": {}}},
                {"kl_reduction": "sum"}):
        with pytest.raises(ValueError):
            LWKD.make_params(bad)


# Teacher-free KD.

@pytest.mark.parametrize(("correct_mass", "T"), [(0.9, 4.0), (0.7, 2.0), (1.0, 3.0)])
def test_tfkd_terms_match_the_formulas(correct_mass: float, T: float) -> None:
    num_classes = 4
    distiller = TFKD(small(4, num_classes), [], TFKD.make_params({"T": T, "correct_mass": correct_mass}))
    images, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 2, 2, 1])
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    assert set(terms) == {"ce", "kd"} and distiller.weights == {"ce": 0.1, "kd": 0.9}
    z = logits.detach()
    off = (1 - correct_mass) / (num_classes - 1)
    # softmax(log q / T) is q^(1/T), renormalised: the temperature softens the virtual teacher.
    teachers = []
    for y in labels.tolist():
        powered = [(correct_mass if c == y else off) ** (1 / T) for c in range(num_classes)]
        teachers.append([v / sum(powered) for v in powered])
    expected = 0.0
    for s_row, t_row in zip(z.tolist(), teachers):
        p = softmax(s_row, T)
        expected += sum(t * (math.log(t) - math.log(pc)) for t, pc in zip(t_row, p) if t > 0)
    expected *= T**2 / len(labels)
    assert math.isfinite(terms["kd"].item())
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_by_hand(z, labels), rel=1e-5)
    mean = TFKD(small(4, num_classes), [], TFKD.make_params({"T": T, "correct_mass": correct_mass, "kl_reduction": "mean"}))
    mean.train()
    _, mean_terms = mean.forward_train(images, labels)
    assert mean_terms["kd"].item() == pytest.approx(expected / num_classes, rel=1e-5)


def test_tfkd_checks_its_params_and_takes_no_sources() -> None:
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="correct_mass"):
            TFKD.make_params({"correct_mass": bad})
    with pytest.raises(ValueError, match="exactly 0"):
        TFKD(small(4), [small(8)], TFKD.make_params())


# Training.

def test_fit_runs_lwkd_and_logs_every_term(digits) -> None:
    student, teacher = small(4), small(4, seed=1)
    teacher_before = copy.deepcopy(teacher.state_dict())
    distiller = LWKD(student, [teacher], LWKD.make_params({"bank_size": 8}))
    reports: list[EpochReport] = []
    fit(distiller, digits, build_recipe("digits", {"epochs": 1}), callback=reports.append)
    metrics = reports[-1].metrics
    for key in ("train_loss_ce", "train_loss_kd", "train_loss_adv", "train_disc_loss", "val_acc"):
        assert math.isfinite(metrics[key]), key
    assert metrics["train_disc_loss"] > 0 and metrics["train_loss_adv"] > 0
    for key, value in teacher_before.items():
        assert torch.equal(teacher.state_dict()[key], value)
    assert distiller.bank.shape == (10, 8, 10)
    assert any(k.startswith("discriminator.") for k in distiller.state_dict())


def test_fit_runs_tfkd(digits) -> None:
    reports: list[EpochReport] = []
    fit(TFKD(small(4), [], TFKD.make_params()), digits, build_recipe("digits", {"epochs": 1}), callback=reports.append)
    metrics = reports[-1].metrics
    assert math.isfinite(metrics["train_loss_kd"]) and math.isfinite(metrics["train_loss_ce"])
    assert "train_loss_adv" not in metrics
