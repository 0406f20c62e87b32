"""DGKD, TAKD, SimKD, SOKD, DML: loss terms by hand, gradient flow, stage graphs; every built-in
method (by the registry): one epoch of fit, TorchScript export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_core.distillers import DISTILLERS
from kd_core.distillers.dgkd import DGKDParams, keep_mask
from kd_core.models import build_model
from kd_core.recipes import build_recipe
from kd_core.stages import SourcePlan, StageSpec
from kd_core.testing import build_distiller

RECIPE = build_recipe("digits", {"epochs": 1}).as_dict()
DATA = {"name": "digits", "seed": 0, "val_fraction": 0.15, "test_fraction": 0.2}


def convnet(width: int, seed: int = 0, depth: int = 1):
    torch.manual_seed(seed)
    return build_model("convnet", 10, 1, {"width": width, "depth": depth}).double()


def kd_by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float, reduction: str = "batchmean") -> torch.Tensor:
    """T^2 * sum_c p_t (log p_t - log p_s), averaged over the batch (and classes for `mean`)."""
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(1, keepdim=True)
    log_p_s = student / t - torch.log(torch.exp(student / t).sum(1, keepdim=True))
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum() / student.shape[0]
    return t * t * (kl / student.shape[1] if reduction == "mean" else kl)


def ce_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    log_p = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    return -log_p[torch.arange(len(labels)), labels].mean()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 5])


def plan(teacher: StageSpec | None = None, assistants: int = 3, fixed: dict | None = None) -> SourcePlan:
    teacher = teacher or StageSpec("teacher", {"name": "convnet", "args": {"width": 16, "depth": 1}}, DATA, RECIPE)
    ladder = tuple({"name": "convnet", "args": {"width": w, "depth": 1}} for w in (12, 8, 6)[:assistants])
    return SourcePlan(teacher, ladder, {"name": "convnet", "args": {"width": 4, "depth": 1}}, DATA, RECIPE,
                      seed=0, num_classes=10, input_shape=(1, 8, 8), fixed_params=fixed or {})


# DGKD -------------------------------------------------------------------------------------


def test_dgkd_terms_by_hand(batch) -> None:
    images, labels = batch
    student, sources = convnet(4), [convnet(16, 1), convnet(8, 2), convnet(6, 3)]
    dgkd = DISTILLERS.get("dgkd")
    distiller = dgkd(student, sources, dgkd.make_params({"drop_mode": "none", "T": 3.0, "kl_reduction": "mean"}))
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    with torch.no_grad():
        expected_kd = sum(kd_by_hand(logits, s.eval()(images), 3.0, "mean") for s in sources)
    torch.testing.assert_close(terms["kd"], expected_kd)
    torch.testing.assert_close(terms["ce"], ce_by_hand(logits, labels))
    assert distiller.weights == {"ce": 0.0, "kd": 1.0}


def keep_rates(num_sources: int, draws: int = 20000, **options) -> tuple[torch.Tensor, list[int]]:
    params = DGKDParams(**options)
    generator = torch.Generator().manual_seed(0)
    masks = torch.tensor([keep_mask(num_sources, params, generator) for _ in range(draws)], dtype=torch.float64)
    assert masks.sum(1).min() >= 1  # never every source dropped
    return masks.mean(0), masks.sum(1).long().tolist()


def test_bernoulli_keep_rates() -> None:
    rates, _ = keep_rates(4, drop_mode="bernoulli", keep_prob=0.75)
    # All four dropped (prob 0.25^4) re-keeps one of them uniformly.
    expected = 0.75 + 0.25**4 / 4
    assert torch.allclose(rates, torch.full((4,), expected, dtype=torch.float64), atol=0.015)
    rates, _ = keep_rates(4, drop_mode="bernoulli", keep_prob=0.5, drop_teacher=False)
    assert rates[0] == 1.0
    assert torch.allclose(rates[1:], torch.full((3,), 0.5, dtype=torch.float64), atol=0.015)


def test_drop_k_keep_rates() -> None:
    rates, kept = keep_rates(4, drop_mode="drop_k", drop_k=1)
    assert set(kept) == {3}  # exactly one removed each time
    assert torch.allclose(rates, torch.full((4,), 0.75, dtype=torch.float64), atol=0.015)
    rates, kept = keep_rates(4, drop_mode="drop_k", drop_k=1, drop_teacher=False)
    assert rates[0] == 1.0 and set(kept) == {3}
    assert torch.allclose(rates[1:], torch.full((3,), 2 / 3, dtype=torch.float64), atol=0.015)
    _, kept = keep_rates(2, draws=200, drop_mode="drop_k", drop_k=5)
    assert set(kept) == {1}  # k is capped so one source always teaches
    _, kept = keep_rates(1, draws=50, drop_mode="drop_k", drop_k=1)
    assert set(kept) == {1}


def test_dgkd_stage_graph_is_dense_and_shared_across_assistant_counts() -> None:
    dgkd = DISTILLERS.get("dgkd")
    stages = {n: dgkd.source_stages(dgkd.make_params({"num_assistants": n, "T": 2.0 + n}), plan()) for n in range(4)}
    assert [s.role for s in stages[3]] == ["teacher", "assistant", "assistant", "assistant"]
    for i, stage in enumerate(stages[3][1:], start=1):
        assert [p.key for p in stage.parents] == [s.key for s in stages[3][:i]]  # T and every larger TA
        assert stage.method["name"] == "dgkd"
    for n in range(4):  # a prefix of the same ladder: trials with fewer assistants reuse them
        assert [s.key for s in stages[n]] == [s.key for s in stages[3][: n + 1]]
    with pytest.raises(ValueError, match="needs 3 assistants but 2 are available"):
        dgkd.source_stages(dgkd.make_params({"num_assistants": 3}), plan(assistants=2))


def test_takd_learns_from_the_immediate_parent_only() -> None:
    takd = DISTILLERS.get("takd")
    (source,) = takd.source_stages(takd.make_params({"num_assistants": 3}), plan())
    chain = [source]
    while chain[-1].parents:
        (parent,) = chain[-1].parents
        chain.append(parent)
    assert [s.role for s in chain] == ["assistant", "assistant", "assistant", "teacher"]
    assert [s.arch["args"]["width"] for s in chain] == [6, 8, 12, 16]
    (direct,) = takd.source_stages(takd.make_params({"num_assistants": 0}), plan())
    assert direct.role == "teacher"


# SimKD ------------------------------------------------------------------------------------


def test_simkd_terms_prediction_and_unused_student_head(batch) -> None:
    images, labels = batch
    student, teacher = convnet(4), convnet(16, 1)
    simkd = DISTILLERS.get("simkd")
    distiller = simkd(student, [teacher], simkd.make_params({"r": 2, "w_ce": 0.5})).double()
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    with torch.no_grad():
        teacher_map = teacher.prehead(images)
    projected = distiller.projector(distiller.deploy.encoder(images))
    torch.testing.assert_close(terms["feat"], ((projected - teacher_map) ** 2).mean())
    torch.testing.assert_close(logits, teacher.head(projected))  # predicted by the teacher's head
    torch.testing.assert_close(terms["ce"], ce_by_hand(logits, labels))
    (terms["feat"] + terms["ce"]).backward()
    assert all(p.grad is None for p in student.head.parameters())  # the student classifier is unused
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in distiller.projector.parameters())
    distiller.eval()
    torch.testing.assert_close(distiller.deployable()(images), teacher.head(distiller.deploy.project(images)))


def test_simkd_deployable_counts_encoder_projector_and_teacher_head() -> None:
    student, teacher = convnet(4), convnet(16, 1)
    simkd = DISTILLERS.get("simkd")
    sizes = {}
    for r in (1, 2, 4):
        deploy = simkd(copy.deepcopy(student), [teacher], simkd.make_params({"r": r})).deployable()
        sizes[r] = sum(p.numel() for p in deploy.parameters())
        encoder = sum(p.numel() for m in (student.stem, student.stages) for p in m.parameters())
        projector = sum(p.numel() for p in deploy.projector.parameters())
        assert sizes[r] == encoder + projector + sum(p.numel() for p in teacher.head.parameters())
    assert sizes[1] > sizes[2] > sizes[4]


def test_simkd_pools_a_larger_student_map_to_the_teacher_size(batch) -> None:
    images, labels = batch
    student, teacher = convnet(4), convnet(16, 1)
    student.neck = nn.Upsample(scale_factor=2)  # student map 4x4, teacher map 2x2
    simkd = DISTILLERS.get("simkd")
    distiller = simkd(student, [teacher], simkd.make_params()).double()
    distiller.train()
    _, terms = distiller.forward_train(images, labels)
    assert distiller.deploy.aligned_size.tolist() == [2, 2]
    projected = distiller.projector(F.adaptive_avg_pool2d(distiller.deploy.encoder(images), (2, 2)))
    with torch.no_grad():
        torch.testing.assert_close(terms["feat"], ((projected - teacher.prehead(images)) ** 2).mean())
    # the alignment travels with the deployable's state dict
    rebuilt = simkd(copy.deepcopy(student), [teacher], simkd.make_params()).double()
    rebuilt.deployable().load_state_dict(distiller.deployable().state_dict())
    assert rebuilt.deploy.aligned_size.tolist() == [2, 2]


def _last_stage(model, images: torch.Tensor) -> torch.Tensor:
    return model.stage_outputs(images)[-1]


def test_simkd_aligns_last_stage_outputs_before_a_channel_changing_neck() -> None:
    """ShuffleNetV2 and MobileNetV2 end in a 1x1 conv to 1024/1280 channels (their neck): f is the
    last stage's output before it (the official feat[-2]), and a teacher's reused classifier is
    its neck + pool + FC. Both once crashed: the projector was sized by the stage, fed the neck."""
    torch.manual_seed(0)
    student, teacher = build_model("shufflenetv2", 100, 3), build_model("mobilenetv2_0_5", 100, 3)
    simkd = DISTILLERS.get("simkd")
    distiller = simkd(student, [teacher], simkd.make_params({"w_ce": 1.0}))
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    assert distiller.projector[0].in_channels == 464 and distiller.projector[-3].out_channels == 160
    with torch.no_grad():
        f_t = _last_stage(teacher, images)  # (2, 160, 2, 2); the student's f_s is (2, 464, 4, 4)
    projected = distiller.projector(F.adaptive_avg_pool2d(_last_stage(student, images), (2, 2)))
    torch.testing.assert_close(terms["feat"], F.mse_loss(projected, f_t))
    torch.testing.assert_close(logits, teacher.head(teacher.neck(projected)))
    (terms["feat"] + terms["ce"]).backward()
    assert all(p.grad is None for p in [*student.neck.parameters(), *student.head.parameters()])
    assert all(p.grad is None for p in teacher.parameters())

    deploy = distiller.deployable()
    count = sum(p.numel() for p in deploy.parameters())
    parts = (student.stem, student.stages, distiller.projector, teacher.neck, teacher.head)
    assert count == sum(p.numel() for m in parts for p in m.parameters())
    deploy.train()
    assert not any(m.training for m in [*teacher.neck.modules(), *teacher.head.modules()])  # frozen, always eval
    distiller.eval()
    with torch.no_grad():
        torch.testing.assert_close(deploy(images), teacher.head(teacher.neck(distiller.projector(
            F.adaptive_avg_pool2d(_last_stage(student, images), (2, 2))))))


def test_simkd_reads_a_pre_activation_net_after_its_final_bn_relu() -> None:
    """WRN's neck (BN + ReLU) keeps the channels: f is what the classifier reads, on both sides."""
    torch.manual_seed(0)
    student, teacher = build_model("wrn_16_1", 100, 3), build_model("wrn_16_2", 100, 3)
    simkd = DISTILLERS.get("simkd")
    distiller = simkd(student, [teacher], simkd.make_params())
    images = torch.randn(2, 3, 32, 32)
    distiller.train()
    _, terms = distiller.forward_train(images, torch.tensor([0, 1]))
    with torch.no_grad():
        f_t = teacher.prehead(images)  # after the final BN + ReLU
    projected = distiller.projector(student.prehead(images))
    torch.testing.assert_close(terms["feat"], F.mse_loss(projected, f_t))
    assert distiller.deploy.encoder.neck is student.neck and isinstance(distiller.deploy.teacher_neck, nn.Identity)


# SOKD -------------------------------------------------------------------------------------


def test_sokd_terms_by_hand_and_no_direct_teacher_term(batch) -> None:
    images, labels = batch
    student, teacher = convnet(4), convnet(16, 1)
    sokd = DISTILLERS.get("sokd")
    distiller = sokd(student, [teacher], sokd.make_params({"teacher_bn": "eval", "T": 2.0})).double()
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    with torch.no_grad():
        trunk = teacher.stages[1](teacher.stages[0](teacher.stem(images)))
        teacher_logits = teacher(images)
    bridge_logits = distiller.bridge(trunk)
    torch.testing.assert_close(terms["kd"], kd_by_hand(logits, bridge_logits, 2.0))
    torch.testing.assert_close(terms["ce"], ce_by_hand(logits, labels))
    torch.testing.assert_close(terms["bridge_ce"], ce_by_hand(bridge_logits, labels))
    torch.testing.assert_close(terms["bridge_t"], kd_by_hand(bridge_logits, teacher_logits, 2.0))
    torch.testing.assert_close(terms["bridge_s"], kd_by_hand(bridge_logits, logits, 2.0))
    # The student's terms do not depend on the teacher's last stage: only the bridge's does.
    with torch.no_grad():
        for p in teacher.stages[2].parameters():
            p.add_(1.0)
    _, again = distiller.forward_train(images, labels)
    torch.testing.assert_close(again["kd"], terms["kd"])
    torch.testing.assert_close(again["ce"], terms["ce"])
    assert not torch.allclose(again["bridge_t"], terms["bridge_t"])


def test_sokd_gradients_bn_and_bridge_init(batch) -> None:
    images, labels = batch
    student, teacher = convnet(4), convnet(16, 1)
    shared = copy.deepcopy(teacher.state_dict())
    sokd = DISTILLERS.get("sokd")
    distiller = sokd(student, [teacher], sokd.make_params({"teacher_bn": "train", "bridge_lr_scale": 0.5})).double()
    distiller.train()
    _, terms = distiller.forward_train(images, labels)
    sum(terms.values()).backward()
    private = distiller.sources[0]
    assert private is not teacher  # BN in train mode works on a copy of the shared teacher
    assert all(p.grad is None for p in private.parameters())
    assert all(p.grad is not None for p in distiller.bridge.parameters())
    assert not torch.equal(private.stem[0][1].running_mean, shared["stem.0.1.running_mean"])  # BN updated
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, shared[key], rtol=0, atol=0)  # the shared teacher is untouched
    assert [g.get("lr_scale", 1.0) for g in distiller.param_groups()] == [1.0, 0.5]
    copied = sokd(convnet(4), [teacher], sokd.make_params({"bridge_init": "teacher_copy"}))
    torch.testing.assert_close(copied.bridge.head.fc.weight, teacher.head.fc.weight)
    fresh = sokd(convnet(4), [teacher], sokd.make_params({"bridge_init": "random"}))
    assert not torch.allclose(fresh.bridge.head.fc.weight, teacher.head.fc.weight)


# DML --------------------------------------------------------------------------------------


def test_dml_terms_by_hand_and_both_networks_learn(batch) -> None:
    images, labels = batch
    dml = DISTILLERS.get("dml")
    distiller = dml(convnet(4), [], dml.make_params({"T": 2.0})).double()
    assert not torch.allclose(distiller.peer.head.fc.weight, distiller.student.head.fc.weight)
    distiller.train()
    logits, terms = distiller.forward_train(images, labels)
    peer_logits = distiller.peer(images)
    torch.testing.assert_close(terms["kd"], kd_by_hand(logits, peer_logits, 2.0))
    torch.testing.assert_close(terms["peer_kd"], kd_by_hand(peer_logits, logits, 2.0))
    torch.testing.assert_close(terms["peer_ce"], ce_by_hand(peer_logits, labels))
    terms["kd"].backward()
    assert all(p.grad is None for p in distiller.peer.parameters())  # the peer side is detached
    assert any(p.grad is not None for p in distiller.student.parameters())


# Reference variants (docs/methods.md): the official codes' losses, written out by hand -----------


def _weighted(method: str, params: dict, student, sources, images, labels) -> torch.Tensor:
    from kd_core.train import weighted_loss

    cls = DISTILLERS.get(method)
    distiller = cls(student, sources, cls.make_params(params)).double()
    distiller.train()
    _, terms = distiller.forward_train(images, labels)
    return weighted_loss(terms, distiller.weights)


def test_takd_official_loss_is_kd_with_mean_kl(batch) -> None:
    """TAKD's train.py: (1 - l) CE + l T^2 KLDivLoss()(log_softmax(z_s/T), softmax(z_t/T)), element mean."""
    images, labels = batch
    student, teacher = convnet(4), convnet(16, 1)
    lam, t = 0.7, 5.0
    z_s, z_t = student(images), teacher.eval()(images).detach()  # a frozen source runs in eval mode
    kl_mean = (F.softmax(z_t / t, 1) * (F.log_softmax(z_t / t, 1) - F.log_softmax(z_s / t, 1))).mean()
    official = (1 - lam) * ce_by_hand(z_s, labels) + lam * t * t * kl_mean
    ours = _weighted("kd", {"T": t, "w_ce": 1 - lam, "w_kd": lam, "kl_reduction": "mean"}, student, [teacher],
                     images, labels)
    torch.testing.assert_close(ours, official)


def test_tfkd_official_regularization_is_tfkd_at_t1_with_mean_kl(batch) -> None:
    """TF-KD's loss_kd_regularization: (1 - a) CE + a m KLDivLoss()(log_softmax(z), softmax(u / tau)),
    u = 0.99 on the label and 0.01 / (K - 1) elsewhere (probabilities softened as logits)."""
    import math

    images, labels = batch
    student = convnet(4)
    k, tau, alpha, multiplier, correct = 10, 20.0, 0.1, 100.0, 0.99
    u = torch.full((len(labels), k), (1 - correct) / (k - 1), dtype=torch.float64)
    u[torch.arange(len(labels)), labels] = correct
    target, z = F.softmax(u / tau, 1), student(images)
    official = (1 - alpha) * ce_by_hand(z, labels) + alpha * multiplier * (
        target * (target.log() - F.log_softmax(z, 1))).mean()
    mass = math.exp(correct / tau) / (math.exp(correct / tau) + (k - 1) * math.exp((1 - correct) / (k - 1) / tau))
    ours = _weighted("tfkd", {"T": 1.0, "kl_reduction": "mean", "correct_mass": mass, "w_ce": 1 - alpha,
                              "w_kd": alpha * multiplier}, student, [], images, labels)
    torch.testing.assert_close(ours, official)


# Every method: by the registry, never a list of names --------------------------------------

# The methods kd_core defines (plugins registered by other test modules are checked in
# test_contract.py); user methods are those swept on their own, not internal stages.
BUILT_IN = [name for name in DISTILLERS.names() if DISTILLERS.get(name).__module__.startswith("kd_core.")]
USER_METHODS = [name for name in BUILT_IN if not DISTILLERS.get(name).internal_stage]


def test_the_registry_holds_every_built_in_method() -> None:
    assert {"ce", "kd", "takd", "dgkd", "simkd", "sokd", "sftn", "sftn_teacher", "lwkd", "tfkd", "dml"} <= set(BUILT_IN)
    assert "sftn_teacher" not in USER_METHODS


@pytest.mark.parametrize("method", BUILT_IN)
def test_one_epoch_of_fit_logs_every_term(method, digits) -> None:
    from kd_core.train import fit

    distiller = build_distiller(method)  # default params, convnet sources from its source_stages
    reports = []
    fit(distiller, digits, build_recipe("digits", {"epochs": 1}), callback=reports.append)
    logged = {k.removeprefix("train_loss_") for k in reports[0].metrics if k.startswith("train_loss_")}
    assert set(distiller.weights) == logged
    assert all(torch.isfinite(torch.tensor(v)) for v in reports[0].metrics.values())


@pytest.mark.parametrize("method", USER_METHODS)
def test_every_method_deploys_as_exported_program(method, tmp_path) -> None:
    """The deployable of each method exports (torch.export, dynamic batch), saves, reloads and
    predicts like the original: the form `kdsweep` ships (sweeps/export.py)."""
    from sweeps.export import exportable

    deploy = build_distiller(method).deployable().eval()
    images = torch.randn(3, 1, 8, 8)
    program = torch.export.export(exportable(deploy), (images,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), deploy(images))
        assert loaded(torch.randn(7, 1, 8, 8)).shape == (7, 10)  # any batch size
