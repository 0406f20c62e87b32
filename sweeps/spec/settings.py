"""The `sweep:` block of a spec: trials, resources, precision, the teacher-output cache,
the sampler, the scheduler, confirmation, objectives and initial points."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sweeps.spec.coerce import Strict


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(3, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class SamplerSpec(Strict):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(6, ge=0)
    multivariate: bool = True
    constant_liar: bool = True


class ConfirmSpec(Strict):
    """Re-train the top-k configurations (ranked on val) with `seeds` new seeds each."""

    top_k: int = Field(0, ge=0)  # 0: no confirmation
    seeds: int = Field(3, ge=1)


class TeacherCacheSpec(Strict):
    """Frozen sources' logits on the training set, computed once per sweep storage and shared
    by every trial (used only by methods whose sources stay frozen and give only logits)."""

    enabled: bool = True
    #: None: one view per image per epoch, the views live training draws (exact); K: a fixed bank of
    #: K views per image (an approximation: the student sees only K augmentations of each image).
    views: int | None = Field(None, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0  # draws the bank's views (views: K only)


class SweepSettings(Strict):
    num_trials: int = Field(16, ge=1)
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)  # > 0 trains on CUDA; fractions share a GPU
    #: CUDA only (CPU trials train in float32 whatever is set here).
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    channels_last: bool = False
    teacher_cache: TeacherCacheSpec = Field(default_factory=TeacherCacheSpec)
    seed: int = 0  # student initialisation and shuffling
    max_failures: int = Field(0, ge=0)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    confirm: ConfirmSpec = Field(default_factory=ConfirmSpec)
    #: `[accuracy]`, or `[accuracy, params | flops]` for a multi-objective search that also
    #: minimises the deployed student's cost (reported as a Pareto front).
    objectives: list[Literal["accuracy", "params", "flops"]] = Field(default_factory=lambda: ["accuracy"])
    #: Configurations tried first (partial ones allowed: the sampler fills in the rest).
    initial_points: list[dict[str, Any]] = Field(default_factory=list)


    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_trial > 0 else "cpu"

    @property
    def cost(self) -> str | None:
        """The cost objective of a multi-objective sweep, else None."""
        return self.objectives[1] if len(self.objectives) > 1 else None

    @model_validator(mode="after")
    def _objectives(self) -> SweepSettings:
        if not self.objectives or self.objectives[0] != "accuracy" or len(self.objectives) > 2 \
                or "accuracy" in self.objectives[1:]:
            raise ValueError("objectives: [accuracy] or [accuracy, params | flops]")
        if self.cost and self.scheduler.type == "asha":
            raise ValueError("a multi-objective sweep cannot use ASHA (it stops trials on one metric): "
                             "set scheduler: {type: none}")
        return self
