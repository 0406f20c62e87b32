"""CRD: Contrastive Representation Distillation (Tian et al., ICLR 2020; official code
HobbitLong/RepDistiller: crd/criterion.py, crd/memory.py, dataset/cifar100.py
`CIFAR100InstanceSample`, train_student.py and scripts/run_cifar_distill.sh).

Embedding heads `embed_s`, `embed_t` (a linear layer on each network's pooled pre-head feature,
(N, C) -> (N, feat_dim), then L2 normalisation) map both networks into one space. Two memory
banks over the whole training set, `memory_s` and `memory_t` (N_train, feat_dim), hold the
student's and the teacher's embedding of every training image. For a batch, each image's
positive is its own row of the other network's bank and its `nce_k` negatives are rows of
images of *other classes*, drawn uniformly without replacement (the official 'exact' mode).
With scores P = exp(v . m / nce_t) / Z, the NCE loss (paper Eq. 18, official `ContrastLoss`) is

    -1/B sum_i [ log(P_i0 / (P_i0 + K/N)) + sum_{j=1..K} log((K/N) / (P_ij + K/N)) ]

taken once with the student as anchor (against `memory_t`) and once with the teacher as anchor
(against `memory_s`); the term `crd` is their sum. Z (one per anchor side) is estimated on the
first batch as mean(exp(v . m / nce_t)) * N_train and kept (the buffer `nce_z`, in the state
dict so that a resume is exact). After the scores, each side's bank rows of the batch move to
normalise(nce_m * row + (1 - nce_m) * v). The banks start uniform in [-s, s], s = 1/sqrt(feat_dim/3)
(not normalised), as in the official code. Both embedding heads train (the teacher's too, as in
the official code); the teacher backbone stays frozen. The deployable is the student alone.

Defaults (train_student.py, run_cifar_distill.sh): feat_dim 128, nce_k 16384, nce_t 0.07,
nce_m 0.5; the loss CE * 1 + KD * 0 + CRD * 0.8 (no KD term here: `w_ce` 1.0, `w_crd` 0.8).

Deviations: when a class-excluding pool is smaller than `nce_k` (small datasets) the number of
negatives is clamped to the smallest pool, N_train - (size of the largest class), where the
official code samples with replacement; CIFAR-100's 45,000 training images (450 a class) leave
44,550 >= 16,384, no clamp. Scores are the anchor's dot products with the whole bank gathered at
the sampled rows (the official code gathers the rows first: the same values, less memory). The
contrast runs in float32 even under autocast (exp(1/0.07) overflows float16). Negatives come
from a device generator seeded, each step, from the global CPU RNG (which `fit` checkpoints), so
a resumed fit draws the same negatives.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.distillers.base import START, MethodParams, TeacherDistiller, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy
from kd_core.models.base import StagedModel

EPS = 1e-7  # the official ContrastLoss's guard against a zero denominator


@dataclasses.dataclass
class CRDParams(MethodParams):
    feat_dim: int = 128  # embedding dimension
    nce_k: int = 16384  # negatives per positive (clamped to the smallest other-class pool)
    nce_t: float = 0.07  # temperature of the scores
    nce_m: float = 0.5  # momentum of the memory bank update
    w_ce: float = 1.0
    w_crd: float = 0.8

    def validate(self) -> None:
        super().validate()
        if self.feat_dim < 1:
            raise ValueError(f"feat_dim must be >= 1, got {self.feat_dim}")
        if self.nce_k < 1:
            raise ValueError(f"nce_k must be >= 1, got {self.nce_k}")
        if self.nce_t <= 0:
            raise ValueError(f"nce_t must be > 0, got {self.nce_t}")
        if not 0 <= self.nce_m < 1:
            raise ValueError(f"nce_m must lie in [0, 1), got {self.nce_m}")


def prehead_channels(model: StagedModel) -> int:
    """Channels of `model.prehead` (the neck may change the last stage's): found by running a
    meta-device copy of the neck, no memory and no compute."""
    neck = copy.deepcopy(model.neck).to("meta").eval()
    with torch.no_grad():
        return neck(torch.empty(2, model.stage_channels[-1], 2, 2, device="meta")).shape[1]


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pool of a pre-head map (N, C, H, W) -> (N, C): RepDistiller's feat[-1]."""
    return torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1)


class Embed(nn.Module):
    """Linear (C -> feat_dim) then L2 normalisation: (N, C) -> (N, feat_dim) unit rows."""

    def __init__(self, in_features: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=1)


def initial_memory(num_samples: int, feat_dim: int, device: torch.device) -> torch.Tensor:
    """A memory bank (num_samples, feat_dim) uniform in [-s, s], s = 1 / sqrt(feat_dim / 3) (rows
    of expected unit norm, not normalised), as the official ContrastMemory starts."""
    bound = 1.0 / math.sqrt(feat_dim / 3)
    return torch.rand(num_samples, feat_dim, device=device).mul_(2 * bound).sub_(bound)


def sample_negatives(
    train_labels: torch.Tensor, index: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """(B, k) int64 dataset indices: for each batch image (dataset index `index[i]`, (B,)), k
    distinct training images of other classes, uniformly (`train_labels` (N,) on one device
    with `index` and `generator`). k must not exceed N minus the largest class's size."""
    scores = torch.rand(len(index), len(train_labels), generator=generator, device=train_labels.device)
    same_class = train_labels[index][:, None] == train_labels[None, :]
    return scores.masked_fill_(same_class, -1.0).topk(k, dim=1).indices  # top k of a uniform draw: a uniform subset


def contrast_scores(
    anchors: torch.Tensor, memory: torch.Tensor, contrast_index: torch.Tensor, nce_t: float
) -> torch.Tensor:
    """exp(anchor_i . memory[contrast_index[i, j]] / nce_t), (B, K+1), before division by Z.

    anchors (B, D) embeddings; memory (N, D) the other network's bank (read without gradient);
    contrast_index (B, K+1): column 0 the positive (the anchor's own dataset index), then K
    negatives."""
    return torch.exp((anchors @ memory.detach().T).gather(1, contrast_index) / nce_t)


def nce_loss(probabilities: torch.Tensor, num_data: int) -> torch.Tensor:
    """The NCE loss of CRD (paper Eq. 18, official ContrastLoss), a 0-dim tensor.

    probabilities (B, K+1): P = exp(score / T) / Z, column 0 the positive, then K negatives; the
    noise distribution is uniform, Pn = 1 / num_data, so a pair is positive with probability
    h = P / (P + K * Pn). Returns -1/B * sum_i [log h_i0 + sum_j log(1 - h_ij)]."""
    k = probabilities.shape[1] - 1
    noise = k / num_data
    positive, negatives = probabilities[:, 0], probabilities[:, 1:]
    log_h_positive = torch.log(positive / (positive + noise + EPS))
    log_1_minus_h_negatives = torch.log(noise / (negatives + noise + EPS))
    return -(log_h_positive.sum() + log_1_minus_h_negatives.sum()) / len(probabilities)


@torch.no_grad()
def momentum_update(
    memory: torch.Tensor, index: torch.Tensor, embeddings: torch.Tensor, momentum: float
) -> torch.Tensor:
    """The bank after a step, a new (N, D) tensor: row index[i] becomes
    normalise(momentum * memory[index[i]] + (1 - momentum) * embeddings[i]), the others stay.

    memory (N, D); index (B,) distinct dataset indices; embeddings (B, D). Out of place: the
    step's graph still holds the old bank (its scores' gradient reads it)."""
    mixed = memory[index] * momentum + embeddings.to(memory.dtype) * (1 - momentum)
    return memory.index_copy(0, index, F.normalize(mixed, dim=1))


@DISTILLERS.register("crd")
class CRDDistiller(TeacherDistiller):
    Params = CRDParams
    needs_sample_index = True

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: CRDParams) -> None:
        super().__init__(student, sources, params)
        self.embed_s = Embed(prehead_channels(student), params.feat_dim)
        self.embed_t = Embed(prehead_channels(self.sources[0]), params.feat_dim)
        # Sized by bind_training_set; empty until then, so a state dict cannot load into an
        # unbound distiller by accident (size mismatch) nor be dropped silently.
        self.register_buffer("memory_s", torch.empty(0, params.feat_dim))
        self.register_buffer("memory_t", torch.empty(0, params.feat_dim))
        self.register_buffer("nce_z", torch.full((2,), -1.0))  # Z of the student-, teacher-anchored scores
        self.register_buffer("train_labels", torch.empty(0, dtype=torch.long), persistent=False)
        self.num_negatives = 0  # min(nce_k, the smallest other-class pool), set by bind_training_set
        self._generator: torch.Generator | None = None

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.embed_s, self.embed_t]

    def bind_training_set(self, labels: torch.Tensor) -> None:
        device = self.embed_s.linear.weight.device
        largest_class = int(torch.bincount(labels.cpu()).max()) if len(labels) else 0
        if len(labels) - largest_class < 1:
            raise ValueError(f"{self.method_label()} needs training images of at least two classes "
                             "(its negatives are images of other classes)")
        self.train_labels = labels.to(device, torch.long)
        self.memory_s = initial_memory(len(labels), self.params.feat_dim, device)
        self.memory_t = initial_memory(len(labels), self.params.feat_dim, device)
        self.nce_z.fill_(-1.0)  # estimated again on the first batch
        self.num_negatives = min(self.params.nce_k, len(labels) - largest_class)

    def _negatives_generator(self, device: torch.device) -> torch.Generator:
        # Seeded from the global CPU RNG, which fit checkpoints: a resume redraws the same negatives.
        seed = int(torch.randint(2**62, ()))
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device)
        return self._generator.manual_seed(seed)

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = self.sample_index
        if index is None or len(self.memory_s) == 0:
            raise RuntimeError(f"{self.method_label()} needs bind_training_set(labels) and sample_index "
                               "(fit sets both)")
        student_map = self.student.prehead(images)
        logits = self.student.head(student_map)
        with torch.no_grad():
            teacher_feature = pooled(self.sources[0].prehead(images))
        v_s, v_t = self.embed_s(pooled(student_map)), self.embed_t(teacher_feature)
        generator = self._negatives_generator(index.device)
        negatives = sample_negatives(self.train_labels, index, self.num_negatives, generator)
        contrast_index = torch.cat([index[:, None], negatives], dim=1)
        num_data = len(self.memory_s)
        with torch.autocast(images.device.type, enabled=False):  # exp(1/nce_t) overflows float16
            v_s, v_t = v_s.float(), v_t.float()
            scores_s = contrast_scores(v_s, self.memory_t, contrast_index, self.params.nce_t)
            scores_t = contrast_scores(v_t, self.memory_s, contrast_index, self.params.nce_t)
            # Z: estimated on the first batch, then kept (no host synchronisation per step).
            estimate = torch.stack([scores_s.mean(), scores_t.mean()]).detach() * num_data
            self.nce_z = torch.where(self.nce_z < 0, estimate, self.nce_z)
            crd = nce_loss(scores_s / self.nce_z[0], num_data) + nce_loss(scores_t / self.nce_z[1], num_data)
        self.memory_s = momentum_update(self.memory_s, index, v_s.detach(), self.params.nce_m)
        self.memory_t = momentum_update(self.memory_t, index, v_t.detach(), self.params.nce_m)
        return logits, {"ce": cross_entropy(logits, labels), "crd": crd}
