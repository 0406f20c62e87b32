"""SFTN: stage-1 terms by hand, gradient flow, branch ownership, deployable, source stages, fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_core.distillers import DISTILLERS
from kd_core.losses import kd_loss
from kd_core.models import build_model
from kd_core.models.base import Head, StagedModel
from kd_core.recipes import build_recipe
from kd_core.stages import SourcePlan, StageSpec

TEACHER_ARCH = {"name": "convnet", "args": {"width": 8, "depth": 1}}
STUDENT_ARCH = {"name": "convnet", "args": {"width": 4, "depth": 1}}


def convnet(width: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("convnet", 10, 1, {"width": width, "depth": 1})


def stage1(params: dict | None = None, sources: list | None = None, teacher_seed: int = 0):
    cls = DISTILLERS.get("sftn_teacher")
    return cls(convnet(8, teacher_seed), sources or [], cls.make_params({"student_arch": STUDENT_ARCH, **(params or {})}))


def plan(fixed: dict | None = None) -> SourcePlan:
    recipe = build_recipe("digits").as_dict()
    teacher = StageSpec("teacher", TEACHER_ARCH, {"name": "digits"}, recipe)
    return SourcePlan(teacher=teacher, assistants=(), student_arch=STUDENT_ARCH, data={"name": "digits"},
                      recipe=recipe, seed=0, num_classes=10, input_shape=(1, 8, 8), fixed_params=fixed or {})


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))


def ce_by_hand(logits, labels) -> float:
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
    return total / len(labels)


def kl_by_hand(branch, teacher, tau: float) -> float:
    """tau^2 * KL(p_T^tau || p_R^tau), summed over classes, averaged over the batch."""
    def softmax(row):
        top = max(v / tau for v in row)
        exps = [math.exp(v / tau - top) for v in row]
        return [e / sum(exps) for e in exps]

    total = 0.0
    for r_row, t_row in zip(branch.tolist(), teacher.tolist()):
        p_t, p_r = softmax(t_row), softmax(r_row)
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_r))
    return tau**2 * total / len(branch)


def test_stage1_terms_by_hand(batch) -> None:
    images, labels = batch
    distiller = stage1({"tau": 2.0}).double()
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    assert set(terms) == {"t_ce", "r_ce", "r_kl"} == set(distiller.weights)
    # Recompute with the distiller's own modules (train-mode BN uses batch statistics: same result).
    teacher = distiller.student
    with torch.no_grad():
        x, features = teacher.stem(images), []
        for stage in teacher.stages:
            x = stage(x)
            features.append(x)
        z_t = teacher.head(teacher.neck(x))
        z_r = []
        for i, branch in enumerate(distiller.branches):
            y = branch.transform(features[i])
            for stage in branch.stages:
                y = stage(y)
            z_r.append(branch.head(branch.neck(y)))
    assert len(z_r) == len(teacher.stages) - 1 == 2
    torch.testing.assert_close(logits, z_t)
    assert terms["t_ce"].item() == pytest.approx(ce_by_hand(z_t, labels), rel=1e-9)
    assert terms["r_ce"].item() == pytest.approx(sum(ce_by_hand(z, labels) for z in z_r), rel=1e-9)
    assert terms["r_kl"].item() == pytest.approx(sum(kl_by_hand(z, z_t, 2.0) for z in z_r), rel=1e-9)


def test_kl_gradient_reaches_the_teacher(batch) -> None:
    images, labels = batch
    distiller = stage1().double()
    distiller.train()
    _, terms = distiller.forward_train(images, labels)
    terms["r_kl"].backward()
    grads = [p.grad for p in distiller.student.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # The canonical kd_loss still detaches the teacher side.
    teacher_logits = torch.randn(4, 10, requires_grad=True)
    kd_loss(torch.randn(4, 10, requires_grad=True), teacher_logits, 2.0).backward()
    assert teacher_logits.grad is None


def test_branches_own_their_weights() -> None:
    distiller = stage1()
    student = convnet(4)
    pointers = [{p.data_ptr() for p in branch.parameters()} for branch in distiller.branches]
    assert pointers[0].isdisjoint(pointers[1])
    assert all(ptrs.isdisjoint({p.data_ptr() for p in distiller.student.parameters()}) for ptrs in pointers)
    assert all(ptrs.isdisjoint({p.data_ptr() for p in student.parameters()}) for ptrs in pointers)
    # Branch i: transform to the student's stage-i channels, then student stages i+1..N-1.
    assert [b.transform[0].in_channels for b in distiller.branches] == [8, 16]
    assert [b.transform[0].out_channels for b in distiller.branches] == [4, 8]
    assert [len(b.stages) for b in distiller.branches] == [2, 1]
    trainable = {id(p) for g in distiller.param_groups() for p in g["params"]}
    assert trainable == {id(p) for p in [*distiller.student.parameters(), *distiller.branches.parameters()]}


def test_branches_match_the_student_resolution_as_well_as_its_channels() -> None:
    """resnet8 runs its stages at 32/16/8 pixels, ShuffleNetV2 at 16/8/4: branch i must hand
    student stage i+1 the student's stage-i map size (it once ran at the teacher's, 2x larger)."""
    cls = DISTILLERS.get("sftn_teacher")
    student_arch = {"name": "shufflenetv2", "args": {"net_size": 0.5}}
    torch.manual_seed(0)
    distiller = cls(build_model("resnet8", 100, 3), [], cls.make_params({"student_arch": student_arch}))
    student = build_model("shufflenetv2", 100, 3, {"net_size": 0.5}).eval()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        expected = [tuple(o.shape[1:]) for o in student.stage_outputs(images)]
    assert expected == [(48, 16, 16), (96, 8, 8), (192, 4, 4)]
    assert distiller.student_sizes((3, 32, 32)) == [shape[1:] for shape in expected]
    transformed = []
    for branch in distiller.branches:
        branch.transform.register_forward_hook(lambda _m, _i, out: transformed.append(tuple(out.shape[1:])))
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    assert transformed == expected[:-1]
    # by hand: pool the teacher map to the student's size, then the branch's own modules
    teacher = distiller.student
    features = teacher.stage_outputs(images)
    z_r = []
    for i, branch in enumerate(distiller.branches):
        x = branch.transform(F.adaptive_avg_pool2d(features[i], expected[i][1:]))
        for stage in branch.stages:
            x = stage(x)
        z_r.append(branch.head(branch.neck(x)))
    torch.testing.assert_close(terms["r_kl"], sum(kd_loss(z, logits, 1.0, detach_teacher=False) for z in z_r))


def test_mismatched_stage_counts_need_branch_joins() -> None:
    cls = DISTILLERS.get("sftn_teacher")
    full = convnet(8)
    two_stages = StagedModel(full.stem, list(full.stages[:2]), Head(16, 10), [8, 16])
    with pytest.raises(ValueError, match="teacher has 2 stages, the student 3: pass branch_joins"):
        cls(two_stages, [], cls.make_params({"student_arch": STUDENT_ARCH}))
    for bad in ([0, 1], [2]):  # one join per teacher stage but the last; each <= the student's N-2
        with pytest.raises(ValueError, match="branch_joins must give"):
            cls(two_stages, [], cls.make_params({"student_arch": STUDENT_ARCH, "branch_joins": bad}))
    with pytest.raises(ValueError, match="stage indices >= 0"):
        cls.make_params({"student_arch": STUDENT_ARCH, "branch_joins": [-1]})
    distiller = cls(two_stages, [], cls.make_params({"student_arch": STUDENT_ARCH, "branch_joins": [1]}))
    assert [len(b.stages) for b in distiller.branches] == [1]  # joins student stage 1, runs stage 2


@pytest.mark.parametrize(("teacher", "student", "joins"), [
    ("resnet8", "resnet8x4", [0, 1]),  # equal counts: block i joins block i (the paper)
    ("resnet32x4", "shufflenetv2", [0, 1]),  # equal counts, even where resolutions differ
    ("vgg13", "mobilenetv2_0_5", [0, 0, 1, 2]),  # 5 vs 4 stages: by resolution (32,16,8,4 -> 16,16,8,4)
    ("resnet50", "vgg8", [0, 1, 2]),  # 4 vs 5: 32,16,8 -> 32,16,8; the branch of stage 2 runs vgg's 3, 4
    ("resnet32x4", "vgg8", [0, 1]),  # 3 vs 5
])
def test_branch_joins_pair_stages_by_resolution_when_counts_differ(teacher, student, joins) -> None:
    stage = DISTILLERS.get("sftn").source_stages(
        DISTILLERS.get("sftn").make_params(),
        SourcePlan(teacher=StageSpec("teacher", {"name": teacher}, {"name": "cifar100"}, build_recipe("crd").as_dict()),
                   assistants=(), student_arch={"name": student}, data={"name": "cifar100"},
                   recipe=build_recipe("crd").as_dict(), seed=0, num_classes=100, input_shape=(3, 32, 32)))[0]
    assert stage.method["params"]["branch_joins"] == joins
    cls = DISTILLERS.get("sftn_teacher")
    torch.manual_seed(0)
    distiller = cls(build_model(teacher, 100, 3), [], cls.make_params(stage.method["params"]))
    student_model = build_model(student, 100, 3).eval()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        student_shapes = [tuple(o.shape[1:]) for o in student_model.stage_outputs(images)]
    transformed = []
    for branch in distiller.branches:
        branch.transform.register_forward_hook(lambda _m, _i, out: transformed.append(tuple(out.shape[1:])))
    distiller.train()
    with torch.no_grad():
        _, terms = distiller.forward_train(images, labels)
    # Each branch hands the joined student stage's output shape to the student's next stage.
    assert transformed == [student_shapes[j] for j in joins]
    assert [len(b.stages) for b in distiller.branches] == [len(student_shapes) - 1 - j for j in joins]
    assert all(torch.isfinite(t) for t in terms.values())


def test_deployable_is_the_teacher_and_loads(batch) -> None:
    distiller = stage1()
    assert distiller.deployable() is distiller.student
    model = build_model(TEACHER_ARCH["name"], 10, 1, TEACHER_ARCH["args"])
    model.load_state_dict(distiller.deployable().state_dict())


def test_finetune_copies_the_parent_and_needs_it() -> None:
    parent = convnet(8, seed=5)
    distiller = stage1({"finetune": True}, sources=[parent], teacher_seed=0)
    for name, value in parent.state_dict().items():
        torch.testing.assert_close(distiller.student.state_dict()[name], value)
    assert not any(p.requires_grad for p in parent.parameters())
    assert all(p.requires_grad for p in distiller.student.parameters())
    assert distiller.student.stem[0][0].weight.data_ptr() != parent.stem[0][0].weight.data_ptr()
    with pytest.raises(ValueError, match="exactly 1 source"):
        stage1({"finetune": True})
    with pytest.raises(ValueError, match="exactly 0 source"):
        stage1(sources=[parent])


def test_student_arch_is_required() -> None:
    with pytest.raises(ValueError, match="student_arch"):
        DISTILLERS.get("sftn_teacher").make_params({})


def test_source_stages() -> None:
    cls = DISTILLERS.get("sftn")
    (stage,) = cls.source_stages(cls.make_params(), plan())
    teacher = plan().teacher
    # stage1_w_* map onto the stage-1 weight fields, named after its terms.
    assert {k: stage.method["params"][k] for k in ("w_t_ce", "w_r_ce", "w_r_kl")} == \
        {"w_t_ce": 1.0, "w_r_ce": 1.0, "w_r_kl": 3.0}
    assert stage.role == "sftn_teacher" and stage.arch == TEACHER_ARCH and stage.parents == ()
    assert stage.method["name"] == "sftn_teacher"
    assert stage.method["params"]["student_arch"] == STUDENT_ARCH
    assert stage.method["params"]["branch_joins"] == [0, 1]  # equal stage counts: i joins i
    assert stage.recipe == teacher.recipe and stage.seed == teacher.seed
    DISTILLERS.get("sftn_teacher").make_params(stage.method["params"])  # a valid stage-1 config

    (tuned,) = cls.source_stages(cls.make_params(), plan({"finetune": True, "stage1_epochs": 3}))
    assert tuned.parents == (teacher,) and tuned.recipe["epochs"] == 3
    assert tuned.method["params"]["finetune"] is True

    # Trial values never change the stage: only the spec's fixed ones do.
    fixed = {"stage1_w_rkl": 1.0}
    a = cls.source_stages(cls.make_params({"T": 2.0, "w_kd": 0.5, **fixed}), plan(fixed))[0]
    b = cls.source_stages(cls.make_params({"T": 8.0, "w_kd": 0.9, "stage1_w_rkl": 5.0}), plan(fixed))[0]
    assert a.key == b.key and a.method["params"]["w_r_kl"] == 1.0
    c = cls.source_stages(cls.make_params(fixed), plan({"stage1_w_rkl": 2.0}))[0]
    d = cls.source_stages(cls.make_params(), plan({"stage1_tau": 4.0}))[0]
    assert len({a.key, c.key, d.key, stage.key, tuned.key}) == 5


def test_stage2_is_kd_from_the_sftn_teacher(batch) -> None:
    images, labels = batch
    cls = DISTILLERS.get("sftn")
    distiller = cls(convnet(4), [convnet(8, 1)], cls.make_params({"T": 3.0}))
    _, terms = distiller.forward_train(images.float(), labels)
    assert set(terms) == {"ce", "kd"}
    assert set(distiller.weights) == {"ce", "kd"}  # stage-1 weights are not stage-2 terms


def test_one_epoch_of_stage1_fit_logs_every_term(digits) -> None:
    from kd_core.train import fit

    distiller = stage1()
    reports = []
    result = fit(distiller, digits, build_recipe("digits", {"epochs": 1}), callback=reports.append)
    metrics = reports[0].metrics
    assert {"train_loss_t_ce", "train_loss_r_ce", "train_loss_r_kl"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    build_model(TEACHER_ARCH["name"], 10, 1, TEACHER_ARCH["args"]).load_state_dict(result.best_state)


def test_stage1_fit_trains_the_teacher_on_the_weighted_terms(digits) -> None:
    """Every stage-1 term is weighted. They once were not (terms t_ce, r_ce, r_kl against
    weights w_t, w_rce, w_rkl): the teacher trained on a zero loss and never changed."""
    from kd_core.train import fit

    distiller = stage1()
    before = {name: p.detach().clone() for name, p in distiller.student.named_parameters()}
    reports = []
    # No weight decay: only the loss's gradient can move the weights.
    fit(distiller, digits, build_recipe("digits", {"epochs": 2, "weight_decay": 0.0}), callback=reports.append)
    first, second = (report.metrics for report in reports)
    weighted = first["train_loss_t_ce"] + first["train_loss_r_ce"] + 3.0 * first["train_loss_r_kl"]
    assert first["train_loss"] == pytest.approx(weighted, rel=1e-5) and first["train_loss"] > 0
    assert second["train_loss"] < first["train_loss"]
    unchanged = [name for name, p in distiller.student.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    assert second["val_acc"] > 0.5  # chance is 0.1
