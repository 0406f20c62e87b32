"""Each loss against values computed by hand from its formula (plain Python math)."""

from __future__ import annotations

import math

import pytest
import torch

from kd_core.losses import cross_entropy, kd_loss

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.5]]


def softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def kd_by_hand(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over the batch of sum_c p_t log(p_t / p_s)."""
    total = 0.0
    for zs, zt in zip(student, teacher):
        ps, pt = softmax(zs, t), softmax(zt, t)
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return t * t * total / len(student)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 7.5])
def test_kd_batchmean_matches_formula(t: float) -> None:
    student = torch.tensor(STUDENT, dtype=torch.float64)
    teacher = torch.tensor(TEACHER, dtype=torch.float64)
    got = kd_loss(student, teacher, t, "batchmean")
    assert got.item() == pytest.approx(kd_by_hand(STUDENT, TEACHER, t), rel=1e-9)


@pytest.mark.parametrize(("t", "expected"), [
    # p_t = (3/4, 1/4), p_s uniform: 0.75 ln 1.5 + 0.25 ln 0.5
    (1.0, 0.75 * math.log(1.5) + 0.25 * math.log(0.5)),
    # T=2: p_t = (r, 1-r) with r = sqrt3/(sqrt3+1); times T^2 = 4
    (2.0, 4 * (math.sqrt(3) / (math.sqrt(3) + 1) * math.log(2 * math.sqrt(3) / (math.sqrt(3) + 1))
               + 1 / (math.sqrt(3) + 1) * math.log(2 / (math.sqrt(3) + 1)))),
])
def test_kd_two_class_closed_form(t: float, expected: float) -> None:
    student = torch.zeros(1, 2, dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert kd_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx([0.130812, 0.145363][int(t) - 1], abs=1e-6)


def test_kd_mean_is_batchmean_over_classes() -> None:
    s, t = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    num_classes = s.shape[1]
    expected = kd_by_hand(STUDENT, TEACHER, 4.0) / num_classes
    assert kd_loss(s, t, 4.0, "mean").item() == pytest.approx(expected, rel=1e-9)


def test_kd_is_zero_for_identical_logits() -> None:
    z = torch.tensor(STUDENT)
    assert kd_loss(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_is_t_times_probability_gap() -> None:
    # d/dz_s [T^2 KL(p_t || p_s)] = T (p_s - p_t) / B for batchmean.
    t = 4.0
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER)
    kd_loss(student, teacher, t).backward()
    for row, (zs, zt) in enumerate(zip(STUDENT, TEACHER)):
        ps, pt = softmax(zs, t), softmax(zt, t)
        for c in range(3):
            expected = t * (ps[c] - pt[c]) / len(STUDENT)
            assert student.grad[row, c].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_kd_teacher_side_is_detached() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_kd_rejects_unknown_reduction() -> None:
    with pytest.raises(ValueError, match="kl_reduction"):
        kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), 2.0, "sum")  # type: ignore[arg-type]


def test_cross_entropy_matches_formula() -> None:
    labels = [1, 2]
    expected = 0.0
    for row, label in zip(STUDENT, labels):
        expected += -math.log(softmax(row, 1.0)[label])
    expected /= len(labels)
    got = cross_entropy(torch.tensor(STUDENT), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)
