"""The baselines DKD, FitNets and AT, and the logit standardization switch: each loss equals a
reference written out from its paper's formula in float64 numpy (never our functions), on
seeded tensors; DKD's warm-up; the switch reaches every method with a KD_T term and is
searchable in a spec."""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
import pytest
import torch

from kd_core.distillers import DISTILLERS, TrainingPosition
from kd_core.distillers.at import at_loss, stage_pairs
from kd_core.distillers.base import SoftTargetParams
from kd_core.distillers.dkd import nckd_loss, tckd_loss
from kd_core.losses import kd_loss, standardize
from kd_core.models import build_model
from kd_core.recipes import Recipe
from kd_core.testing import build_distiller
from kd_core.train import fit
from sweeps.space import SearchSpace, resolve_trial
from sweeps.spec import parse_spec

TOL = 1e-5


def seeded(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q)))


def np_zscore(z: np.ndarray) -> np.ndarray:
    # As the official code: Bessel-corrected std, 1e-7 added to it.
    return (z - z.mean()) / (z.std(ddof=1) + 1e-7)


def np_kd(zs: np.ndarray, zt: np.ndarray, T: float) -> float:
    return T**2 * np.mean([np_kl(np_softmax(t / T), np_softmax(s / T)) for s, t in zip(zs, zt)])


def np_dkd(zs: np.ndarray, zt: np.ndarray, labels: np.ndarray, T: float) -> tuple[float, float]:
    """(TCKD, NCKD) of the paper, sample by sample."""
    tckd, nckd = [], []
    for s, t, y in zip(zs, zt, labels):
        ps, pt = np_softmax(s / T), np_softmax(t / T)
        bs, bt = np.array([ps[y], 1 - ps[y]]), np.array([pt[y], 1 - pt[y]])
        others = [k for k in range(len(s)) if k != y]
        qs, qt = ps[others] / (1 - ps[y]), pt[others] / (1 - pt[y])
        tckd.append(np_kl(bt, bs))
        nckd.append(np_kl(qt, qs))
    return T**2 * float(np.mean(tckd)), T**2 * float(np.mean(nckd))


LOGITS = (seeded(6, 10, seed=1), seeded(6, 10, seed=2), torch.tensor([0, 3, 9, 3, 5, 1]))


# DKD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_terms_equal_the_paper(T: float) -> None:
    student, teacher, labels = LOGITS
    tckd, nckd = np_dkd(student.double().numpy(), teacher.double().numpy(), labels.numpy(), T)
    assert tckd_loss(student, teacher, labels, T).item() == pytest.approx(tckd, abs=TOL)
    assert nckd_loss(student, teacher, labels, T).item() == pytest.approx(nckd, abs=TOL)


def test_dkd_decomposes_kd() -> None:
    # The paper's Eq. (7): KD = TCKD + (1 - p_t^gt) NCKD, sample by sample.
    student, teacher, labels = (x[:1] for x in LOGITS)
    T = 2.0
    p_gt = torch.softmax(teacher / T, dim=1)[0, labels[0]].item()
    decomposed = tckd_loss(student, teacher, labels, T) + (1 - p_gt) * nckd_loss(student, teacher, labels, T)
    assert decomposed.item() == pytest.approx(kd_loss(student, teacher, T).item(), abs=TOL)


def test_dkd_terms_stay_finite_for_a_certain_teacher() -> None:
    student, teacher, labels = LOGITS
    certain = teacher.clone()
    certain[torch.arange(6), labels] = 1e4  # p_gt rounds to 1 in float32
    assert torch.isfinite(tckd_loss(student, certain, labels, 4.0))
    assert torch.isfinite(nckd_loss(student, certain, labels, 4.0))


def _dkd(values: dict) -> torch.nn.Module:
    distiller = build_distiller("dkd", num_classes=10)
    distiller.params = DISTILLERS.get("dkd").make_params(values)
    return distiller.train()


def _dkd_reference(distiller, images, labels, standardized: bool) -> tuple[float, float, float]:
    with torch.no_grad():
        zs = distiller.student(images).double().numpy()
        zt = distiller.sources[0](images).double().numpy()
    if standardized:
        zs, zt = np.stack([np_zscore(z) for z in zs]), np.stack([np_zscore(z) for z in zt])
    return np_dkd(zs, zt, labels.numpy(), distiller.params.T)


@pytest.mark.parametrize(("epoch", "warmup", "factor"), [
    (1, 20.0, 1 / 20), (10, 20.0, 0.5), (20, 20.0, 1.0), (240, 20.0, 1.0), (1, 0.0, 1.0), (2, 4.0, 0.5),
])
def test_dkd_warmup_scales_the_kd_terms(epoch: int, warmup: float, factor: float) -> None:
    distiller = _dkd({"warmup_epochs": warmup})
    images, labels = seeded(4, 1, 8, 8, seed=3, scale=1.0), torch.tensor([0, 1, 2, 9])
    position = TrainingPosition(epoch=epoch, step=(epoch - 1) * 5, steps_per_epoch=5, epochs=240)
    torch.manual_seed(0)
    _, terms = distiller.forward_train(images, labels, position)
    tckd, nckd = _dkd_reference(distiller, images, labels, standardized=False)
    assert terms["tckd"].item() == pytest.approx(factor * tckd, abs=TOL)
    assert terms["nckd"].item() == pytest.approx(factor * nckd, abs=TOL)


def test_dkd_standardizes_its_logits() -> None:
    distiller = _dkd({"logit_standardization": True, "T": 2.0, "warmup_epochs": 0.0})
    images, labels = seeded(4, 1, 8, 8, seed=4, scale=1.0), torch.tensor([3, 1, 2, 9])
    _, terms = distiller.forward_train(images, labels)
    tckd, nckd = _dkd_reference(distiller, images, labels, standardized=True)
    assert terms["tckd"].item() == pytest.approx(tckd, abs=TOL)
    assert terms["nckd"].item() == pytest.approx(nckd, abs=TOL)


def test_dkd_defaults_are_the_official_ones() -> None:
    params = DISTILLERS.get("dkd").make_params()
    assert (params.w_ce, params.w_tckd, params.w_nckd, params.T, params.warmup_epochs) == (1.0, 1.0, 8.0, 4.0, 20.0)
    assert DISTILLERS.get("dkd").can_cache_sources()


@pytest.mark.parametrize(("values", "message"), [
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ({"kl_reduction": "mean"}, "kl_reduction must be 'batchmean'"),
    ({"w_nckd": -1}, "w_nckd must be >= 0"),
    ({"T": 0}, "T must be > 0"),
])
def test_dkd_rejects_invalid_params(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DISTILLERS.get("dkd").make_params(values)


# FitNets -----------------------------------------------------------------------------------


def np_pool(x: np.ndarray, size: int) -> np.ndarray:
    """Average pooling of (N, C, H, H) to (N, C, size, size), H a multiple of size."""
    n, c, h, _ = x.shape
    k = h // size
    return x.reshape(n, c, size, k, size, k).mean(axis=(3, 5))


def np_regressor(module: torch.nn.Sequential, x: np.ndarray) -> np.ndarray:
    """1x1 conv + BN (training mode: batch statistics, biased variance) + ReLU, written out."""
    conv, bn = module[0], module[1]
    w = conv.weight.detach().double().numpy()[:, :, 0, 0]
    y = np.einsum("oc,nchw->nohw", w, x) + conv.bias.detach().double().numpy()[None, :, None, None]
    mean, var = y.mean(axis=(0, 2, 3), keepdims=True), y.var(axis=(0, 2, 3), keepdims=True)
    gamma = bn.weight.detach().double().numpy()[None, :, None, None]
    beta = bn.bias.detach().double().numpy()[None, :, None, None]
    return np.maximum((y - mean) / np.sqrt(var + bn.eps) * gamma + beta, 0.0)


def _fitnets(values: dict):
    cls = DISTILLERS.get("fitnets")
    torch.manual_seed(0)
    student = build_model("convnet", 10, 1, {"width": 4, "depth": 1})
    teacher = build_model("convnet", 10, 1, {"width": 8, "depth": 1})
    with torch.no_grad():  # a non-trivial BN affine, so the reference checks it
        for module in [student, teacher]:
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return cls(student, [teacher], cls.make_params(values)).train()


@pytest.mark.parametrize(("student_stage", "teacher_stage"), [(1, 1), (-1, 2), (0, 1), (1, 0)])
def test_fitnets_hint_equals_the_paper(student_stage: int, teacher_stage: int) -> None:
    distiller = _fitnets({"student_stage": student_stage, "teacher_stage": teacher_stage})
    images, labels = seeded(4, 1, 8, 8, seed=5, scale=1.0), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        f_s = distiller.student.stage_outputs(images)[student_stage].double().numpy()
        f_t = distiller.sources[0].stage_outputs(images)[teacher_stage].double().numpy()
    size = min(f_s.shape[-1], f_t.shape[-1])  # the larger map pooled to the smaller
    f_s, f_t = np_pool(f_s, size), np_pool(f_t, size)
    expected = float(np.mean((np_regressor(distiller.regressor, f_s) - f_t) ** 2))
    _, terms = distiller.forward_train(images, labels)
    assert terms["hint"].item() == pytest.approx(expected, abs=TOL)


def test_fitnets_defaults_follow_repdistiller() -> None:
    params = DISTILLERS.get("fitnets").make_params()
    assert (params.student_stage, params.teacher_stage, params.w_ce, params.w_hint) == (1, 1, 1.0, 100.0)
    assert params.weights() == {"ce": 1.0, "hint": 100.0}  # no KD term (RepDistiller -a 0)


@pytest.mark.parametrize(("values", "message"), [
    ({"student_stage": 3}, r"student_stage=3 is out of range: the model has 3 stages \(valid: -3..2\)"),
    ({"teacher_stage": -4}, r"teacher_stage=-4 is out of range: the model has 3 stages \(valid: -3..2\)"),
])
def test_fitnets_rejects_stages_the_models_lack(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _fitnets(values)


def test_fitnets_rejects_a_non_integer_stage() -> None:
    with pytest.raises(ValueError, match="student_stage must be an integer stage index, got 1.5"):
        DISTILLERS.get("fitnets").make_params({"student_stage": 1.5})


# AT ----------------------------------------------------------------------------------------


def np_attention(f: np.ndarray) -> np.ndarray:
    """The paper's p = 2 map: sum over channels of f^2 (the mean differs by a constant that the
    normalisation removes), flattened, unit L2 norm per sample."""
    a = (f**2).sum(axis=1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def np_at(f_s: np.ndarray, f_t: np.ndarray) -> float:
    size = min(f_s.shape[-1], f_t.shape[-1])
    return float(np.mean((np_attention(np_pool(f_s, size)) - np_attention(np_pool(f_t, size))) ** 2))


@pytest.mark.parametrize(("student_shape", "teacher_shape"), [
    ((3, 4, 8, 8), (3, 16, 8, 8)), ((3, 4, 8, 8), (3, 16, 4, 4)), ((3, 4, 2, 2), (3, 6, 8, 8)),
])
def test_at_loss_equals_the_paper(student_shape: tuple, teacher_shape: tuple) -> None:
    f_s, f_t = seeded(*student_shape, seed=6), seeded(*teacher_shape, seed=7)
    expected = np_at(f_s.double().numpy(), f_t.double().numpy())
    assert at_loss(f_s, f_t, 2.0).item() == pytest.approx(expected, abs=TOL)


def test_at_term_sums_every_stage_pair() -> None:
    cls = DISTILLERS.get("at")
    torch.manual_seed(0)
    student = build_model("convnet", 10, 1, {"width": 4, "depth": 1})
    teacher = build_model("convnet", 10, 1, {"width": 8, "depth": 2})
    distiller = cls(student, [teacher], cls.make_params()).train()
    images, labels = seeded(4, 1, 8, 8, seed=8, scale=1.0), torch.tensor([0, 1, 2, 3])
    _, terms = distiller.forward_train(images, labels)
    with torch.no_grad():
        pairs = zip(student.stage_outputs(images), teacher.stage_outputs(images), strict=True)
        expected = sum(np_at(f_s.double().numpy(), f_t.double().numpy()) for f_s, f_t in pairs)
    assert terms["at"].item() == pytest.approx(expected, abs=TOL)


VGG13 = [(32, 32), (16, 16), (8, 8), (4, 4), (4, 4)]
MOBILENETV2 = [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_at_pairs_stages_by_index_or_resolution() -> None:
    assert stage_pairs(MOBILENETV2, VGG13, "index") == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert stage_pairs(MOBILENETV2, VGG13, "resolution") == [(0, 1), (1, 2), (2, 4)]
    assert stage_pairs(VGG13, MOBILENETV2, "resolution") == [(1, 0), (2, 1), (4, 2)]
    with pytest.raises(ValueError, match="AT found no stage pair"):
        stage_pairs([(3, 3)], [(2, 2)], "resolution")


@pytest.mark.parametrize(("values", "message"), [
    ({"p": 0}, "p must be > 0"), ({"pairing": "depth"}, "pairing must be one of index, resolution"),
])
def test_at_rejects_invalid_params(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DISTILLERS.get("at").make_params(values)


def test_at_defaults_follow_the_official_code() -> None:
    params = DISTILLERS.get("at").make_params()
    assert (params.p, params.pairing, params.w_ce, params.w_at) == (2.0, "index", 1.0, 1000.0)


# Logit standardization ---------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_standardized_kd_equals_the_zscore_formula(T: float) -> None:
    student, teacher, _ = LOGITS
    zs = np.stack([np_zscore(z) for z in student.double().numpy()])
    zt = np.stack([np_zscore(z) for z in teacher.double().numpy()])
    got = kd_loss(student, teacher, T, logit_standardization=True).item()
    assert got == pytest.approx(np_kd(zs, zt, T), abs=TOL)
    assert got != pytest.approx(kd_loss(student, teacher, T).item(), abs=1e-3)


def test_standardization_off_is_the_plain_kd() -> None:
    student, teacher, _ = LOGITS
    plain = kd_loss(student, teacher, 4.0, logit_standardization=False)
    assert torch.equal(plain, kd_loss(student, teacher, 4.0))
    assert plain.item() == pytest.approx(np_kd(student.double().numpy(), teacher.double().numpy(), 4.0), abs=TOL)


def test_standardized_kd_ignores_the_logits_range() -> None:
    student, teacher, _ = LOGITS
    shifted = 5.0 * student + torch.arange(6.0)[:, None]  # per-sample scale and shift
    torch.testing.assert_close(kd_loss(shifted, teacher, 2.0, logit_standardization=True),
                               kd_loss(student, teacher, 2.0, logit_standardization=True))
    z = standardize(student)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(6))


SOFT_TARGET_METHODS = [name for name in DISTILLERS.names()
                       if issubclass(DISTILLERS.get(name).Params, SoftTargetParams)]


def test_the_soft_target_methods_are_found() -> None:
    assert {"kd", "takd", "dgkd", "dml", "sokd", "tfkd", "lwkd", "sftn", "dkd"} <= set(SOFT_TARGET_METHODS)


@pytest.mark.parametrize("method", SOFT_TARGET_METHODS)
def test_every_soft_target_method_honours_logit_standardization(method: str) -> None:
    def terms(on: bool) -> dict[str, float]:
        distiller = build_distiller(method, num_classes=10)
        distiller.params = dataclasses.replace(distiller.params, logit_standardization=on)
        distiller.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random draws (DGKD's dropped links, LW-KD's bank entries)
            images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
            _, result = distiller.forward_train(images, labels)
        return {name: value.item() for name, value in result.items()}

    off, on = terms(False), terms(True)
    assert off["ce"] == pytest.approx(on["ce"])  # only the soft-target terms change
    changed = [name for name in off if off[name] != pytest.approx(on[name], abs=1e-6)]
    assert changed, f"{method}: no term changed with logit_standardization"


def test_logit_standardization_is_searchable(spec_dict) -> None:
    spec_dict["search"] = {"method.logit_standardization": {"choices": [True, False]}}
    spec = parse_spec(spec_dict)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        SearchSpace(spec)(trial)
        plan = resolve_trial(spec, dict(trial.params))
        assert isinstance(plan.params.logit_standardization, bool)
        seen.add(plan.params.logit_standardization)
        study.tell(trial, 0.0)
    assert seen == {True, False}


def test_logit_standardization_rejects_a_non_bool() -> None:
    with pytest.raises(ValueError, match="logit_standardization must be true or false"):
        DISTILLERS.get("kd").make_params({"logit_standardization": "yes"})


# Training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dkd", "fitnets", "at"])
def test_each_baseline_trains_in_fit(method: str, digits) -> None:
    cls = DISTILLERS.get(method)
    torch.manual_seed(0)
    student = build_model("convnet", 10, 1, {"width": 4, "depth": 1})
    teacher = build_model("convnet", 10, 1, {"width": 8, "depth": 1})
    values = {"warmup_epochs": 2.0} if method == "dkd" else {}
    distiller = cls(student, [teacher], cls.make_params(values))
    reports = []
    fit(distiller, digits, Recipe(epochs=2, batch_size=128, lr=0.05), callback=reports.append)
    terms = set(cls.make_params().weights())
    for report in reports:
        assert all(np.isfinite(report.metrics[f"train_loss_{term}"]) for term in terms)
    assert cls.can_cache_sources() == (method == "dkd")  # DKD reads its teacher's logits alone
