"""The Distiller interface: one stage's trainable modules and its named loss terms.

`forward_train` returns the student logits and a dict of *unweighted* terms; the trainer
multiplies each by `weights[term]`, sums, steps and logs every term. The term names and the
params' `w_<term>` fields must match exactly (`Distiller.check_terms`, called by `fit` on every
step): a term without a weight, or a weight without a term, is a `ContractError`, never a
silent zero. Frozen sources (the teacher, assistants) run in eval mode under `torch.no_grad()`.
`kd_core.testing.check_distiller` checks the whole contract for any registered method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import KL_REDUCTIONS
from kd_core.models.base import StagedModel
from kd_core.stages import SourcePlan, StageSpec


@dataclasses.dataclass
class MethodParams:
    """Base of every method's hyperparameters; subclasses add fields with defaults."""

    def weights(self) -> dict[str, float]:
        """The loss weights, by term name: every field named `w_<term>`."""
        return {
            f.name[2:]: float(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name.startswith("w_")
        }

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an invalid value; subclasses extend it."""
        for term, weight in self.weights().items():
            if weight < 0:
                raise ValueError(f"w_{term} must be >= 0, got {weight}")


@dataclasses.dataclass
class SoftTargetParams(MethodParams):
    """Base of the params of methods with a KD_T term: its temperature and KL reduction, and
    whether logits are z-scored before the temperature (`kd_core.losses.standardize`)."""

    T: float = 4.0
    kl_reduction: str = "batchmean"
    # Sun et al., CVPR 2024; their recipe pairs it with T=2 and a KD weight of 9 (docs/methods.md).
    logit_standardization: bool = False

    def validate(self) -> None:
        super().validate()
        if self.T <= 0:
            raise ValueError(f"T must be > 0, got {self.T}")
        if not isinstance(self.logit_standardization, bool):
            raise ValueError(f"logit_standardization must be true or false, got {self.logit_standardization!r}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {', '.join(KL_REDUCTIONS)}, got {self.kl_reduction!r}")


@dataclasses.dataclass(frozen=True)
class TrainingPosition:
    """Where training stands when `fit` calls `forward_train`, so schedules (a loss warm-up,
    a ramped weight) need no counter of their own and survive a resume.

    `epoch` is 1-based (1..epochs); `step` is the 0-based global optimizer step
    ((epoch - 1) * steps_per_epoch + the batch's index in its epoch); `steps_per_epoch` counts
    the training batches of one epoch, the last partial batch included.
    """

    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int

    def __post_init__(self) -> None:
        if self.epoch < 1 or self.epochs < 1 or self.steps_per_epoch < 1 or self.step < 0:
            raise ValueError(f"invalid training position {self}: epoch, epochs and steps_per_epoch "
                             "must be >= 1 and step >= 0")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: steps_per_epoch * epochs."""
        return self.steps_per_epoch * self.epochs

    @property
    def progress(self) -> float:
        """step / total_steps, clipped to [0, 1]: 0 at the first step."""
        return min(1.0, self.step / self.total_steps)


#: The default position of `forward_train`: the first step of a one-step run (ad-hoc calls).
START = TrainingPosition(epoch=1, step=0, steps_per_epoch=1, epochs=1)


class ContractError(ValueError):
    """A method breaks the Distiller contract (e.g. its loss terms and weight fields differ)."""


class Distiller(nn.Module):
    """One stage of a method: the student, the frozen sources it learns from, its params.

    A subclass sets `Params` (a `MethodParams` dataclass with one `w_<term>` field per loss
    term), implements `forward_train` and overrides the other hooks only where it differs:

    - `source_stages` (classmethod): which stages it learns from, as `StageSpec`s;
    - `trainable_modules` / `param_groups`: what the trainer's optimizer updates;
    - `after_step`: an extra update with the method's own optimizer (e.g. a discriminator);
    - `bind_training_set`: per-sample state over the training set (CRD's memory banks), for a
      method with `needs_sample_index`;
    - `predict` / `deployable`: the model that is evaluated and exported;
    - `train`: only to change how sources behave in training mode (SOKD's teacher BN).

    `__init__(student, sources, params)` receives the sources in the order `source_stages`
    lists them; it raises ValueError on a wrong number of sources or mismatched models. The
    base class freezes the sources (no grad, eval mode). `fit` owns the optimizer, the loss
    weighting and the loop; a method never weights its own terms.
    `kd_core.testing.check_distiller(name)` checks every rule stated here.
    """

    Params: ClassVar[type[MethodParams]] = MethodParams
    #: Whether the sources' outputs stay fixed during training (cacheable across trials). When
    #: True, no gradient may reach a source and sources stay in eval mode.
    frozen_sources: ClassVar[bool] = True
    #: Whether the sources are read only through `source_logits`, so that logits cached once
    #: per sweep (kd_core.cache) can stand in for their forward pass.
    logit_sources: ClassVar[bool] = False
    #: Whether the method is only a stage of another method (built by that method's
    #: `source_stages`, e.g. sftn_teacher inside sftn), never swept on its own. Its
    #: `source_stages` may raise ValueError; `check_distiller` builds it as its parent does.
    internal_stage: ClassVar[bool] = False
    #: Whether `forward_train` reads `sample_index`, the batch's dataset indices into the
    #: training split (CRD's memory banks). `fit` then calls `bind_training_set` before training
    #: and refuses, with a ValueError naming the method, a training split that cannot give the
    #: indices (one not replayed by `kd_core.cache`: a DataLoader-backed split).
    needs_sample_index: ClassVar[bool] = False

    def __init__(
        self, student: StagedModel, sources: Sequence[StagedModel], params: MethodParams
    ) -> None:
        super().__init__()
        self.student = student
        self.sources = nn.ModuleList(sources)
        self.params = params
        #: The current batch's source logits from the teacher-output cache, set by `fit`.
        self.cached_source_logits: list[torch.Tensor] | None = None
        #: The current batch's dataset indices into the training split, (N,) int64 on the
        #: training device, set by `fit` on every step (None where the split cannot give them).
        self.sample_index: torch.Tensor | None = None
        for source in self.sources:
            source.requires_grad_(False)
            source.eval()

    def expect_sources(self, count: int) -> None:
        """Raise ValueError unless exactly `count` sources were given."""
        if len(self.sources) != count:
            raise ValueError(f"{type(self).__name__} learns from exactly {count} "
                             f"source{'s' * (count != 1)}, got {len(self.sources)}")

    @classmethod
    def make_params(cls, values: dict[str, Any] | None = None) -> MethodParams:
        """The method's params from a dict; unknown names, and invalid values (`validate`),
        raise a ValueError naming them."""
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls.Params)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"unknown parameter {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
            )
        return cls.Params(**values)

    @classmethod
    def method_label(cls) -> str:
        """How errors name the method: "method 'kd' (KDDistiller)", or the class name alone
        when it is not registered in DISTILLERS."""
        name = DISTILLERS.name_of(cls)
        return f"method {name!r} ({cls.__name__})" if name is not None else f"method {cls.__name__}"

    def check_terms(self, terms: Iterable[str]) -> None:
        """Raise ContractError unless the term names equal the params' weight fields exactly.

        Both directions are errors: a term without a `w_<term>` field (it would be silently
        dropped) and a `w_<term>` field whose term is never returned (a knob that does nothing).
        A set comparison: cheap enough for every step.
        """
        returned, weighted = set(terms), set(self.params.weights())
        if returned == weighted:
            return
        params = type(self.params).__name__
        problems = []
        if unweighted := sorted(returned - weighted):
            plural = len(unweighted) > 1
            problems.append(
                f"returned loss term{'s' * plural} {_quoted(unweighted)} without "
                f"{'weight fields' if plural else 'a weight field'} {_quoted(f'w_{t}' for t in unweighted)} "
                f"in {params}"
            )
        if unused := sorted(weighted - returned):
            plural = len(unused) > 1
            problems.append(
                f"{params} declares {_quoted(f'w_{t}' for t in unused)} but forward_train never returns "
                f"{'terms' if plural else 'a term'} {_quoted(unused)}"
            )
        separator = " " if unweighted else ": "  # "method 'x' (X) returned ..." / "method 'x' (X): XParams ..."
        raise ContractError(f"{self.method_label()}{separator}{'; '.join(problems)}")

    def train(self, mode: bool = True) -> Distiller:
        """Set training mode; frozen sources stay in eval mode (their BN statistics fixed)."""
        super().train(mode)
        for source in self.sources:
            source.eval()  # frozen sources never leave eval mode
        return self

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        """The frozen stages this method learns from, in the order `__init__` receives them.

        Pure: builds `StageSpec`s from `params` and `plan` (derived stages, e.g. assistants,
        via `plan.stage`) and trains nothing. A derived stage must depend on the plan's fixed
        params only, never a trial's sampled values, so that trials share it. Raises ValueError
        when the plan lacks what the method needs (no teacher, too few assistants).
        """
        return []

    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimizer updates (the student, plus any module the
        method trains alongside it). Never a frozen source; a module stepped by the method's
        own optimizer in `after_step` is not listed here."""
        return [self.student]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: together they hold every parameter of
        `trainable_modules` exactly once. A group's optional `lr_scale` multiplies the
        recipe lr; no other keys (the recipe sets lr, momentum and weight decay)."""
        return [{"params": [p for m in self.trainable_modules() for p in m.parameters()]}]

    def bind_training_set(self, labels: torch.Tensor) -> None:
        """Called by `fit`, for a method with `needs_sample_index`, before the optimizer is
        built and before a checkpoint is restored: `labels` (N_train,) int64 are the training
        split's labels in dataset-index order (the indices `sample_index` holds), on the
        training device. A method allocates its per-sample state here as buffers, so that they
        are in the state dict and a resumed fit restores them. Default: nothing."""

    def after_step(
        self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, float]:
        """Called by `fit` after each optimizer step with the step's batch and its detached
        student logits (N, num_classes): an extra update with the method's own optimizer
        (e.g. LW-KD's discriminator). It must not touch the trainer's optimizer or the
        trainable modules' weights. Returns metrics as plain floats, logged as `train_<name>`
        (averaged over the epoch)."""
        return {}

    @property
    def weights(self) -> dict[str, float]:
        """The loss weights by term name (the params' `w_<term>` fields)."""
        return self.params.weights()

    @classmethod
    def can_cache_sources(cls) -> bool:
        """Whether `fit` may replay cached source logits instead of running the sources."""
        return cls.frozen_sources and cls.logit_sources

    @torch.no_grad()
    def source_logits(self, images: torch.Tensor, only: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Logits (N, num_classes) of the sources (or of those at positions `only`): cached ones
        when `fit` has them for this batch, else a forward pass of each, without gradients.

        A method with `logit_sources = True` must read its sources through this alone (never
        `self.sources[i](...)` or their features), or the cache would be wrong for it.
        """
        chosen = range(len(self.sources)) if only is None else only
        if self.cached_source_logits is not None:
            return [self.cached_source_logits[i] for i in chosen]
        return [self.sources[i](images) for i in chosen]

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training forward pass: the student logits and the unweighted loss terms.

        Args:
            images: (N, C, H, W) float inputs on the training device (already augmented).
            labels: (N,) int64 class indices on the same device.
            position: where training stands (`fit` passes it on every step); `START` for an
                ad-hoc call. Methods with a schedule (a warm-up) read it instead of counting.

        A method with `needs_sample_index` reads the batch's dataset indices from
        `self.sample_index` ((N,) int64, set by `fit` next to `cached_source_logits`).

        Returns:
            logits: (N, num_classes), the student's (what train accuracy is measured on).
            terms: term name -> 0-dim float tensor, *unweighted*; the names must equal the
            params' `w_<term>` fields exactly (`fit` raises ContractError otherwise). Sources
            are read without gradients; only the trainable modules may receive gradients.

        It never steps an optimizer or weights its terms. Raises NotImplementedError here.
        """
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of the deployable model; in eval mode equal to
        `self.deployable()(images)` (it is called in eval mode)."""
        return self.student(images)

    def deployable(self) -> nn.Module:
        """The module exported after training (the student, for most methods): a plain
        `images -> logits` module whose `state_dict` alone restores it into a fresh
        distiller's deployable (same construction). Returns the same object on every call."""
        return self.student


class TeacherDistiller(Distiller):
    """A method that learns from one frozen teacher, the spec's `teacher` stage: checks it gets
    exactly one source (ContractError otherwise) and asks the plan for the teacher (ValueError
    when the spec has none)."""

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: MethodParams) -> None:
        super().__init__(student, sources, params)
        self.expect_sources(1)

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        return [plan.require_teacher()]


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)
