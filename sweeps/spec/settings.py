"""The `sweep:` block of a spec: trials, resources, precision, the teacher-output cache,
the sampler, the scheduler, confirmation, objectives and initial points."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from sweeps.spec.coerce import Strict

# Sane upper bounds: a larger value is a typo (`num_trials: 1e20`), never a plan.
MAX_TRIALS = 100_000
MAX_CONCURRENT = 1_024
MAX_CPUS_PER_TRIAL = 1_024
MAX_GPUS_PER_TRIAL = 64
MAX_WORKERS_PER_TRIAL = 256
MAX_EPOCH_COUNT = 100_000  # grace_period (epochs)
MAX_RETRIES = 1_000  # max_failures, confirmation top_k and seeds, startup trials, bank views
MAX_TIME_BUDGET_S = 366 * 86_400  # sweep.time_budget: a year; more is a typo
MAX_INTERVAL_S = 86_400  # sweep.checkpoint_interval and report_interval: a day
DURATION_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}  # "90s", "30m", "2h", "1d"


def count(low: int, high: int) -> Any:
    """An int field between `low` and `high`; a float (1e20, 2.5, even 2.0) is refused, not truncated."""

    def whole(value: Any) -> Any:
        if isinstance(value, bool | float):
            raise ValueError(f"{value!r} is not a whole number (a count from {low} to {high})")
        return value

    return Annotated[int, BeforeValidator(whole), Field(ge=low, le=high)]


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: count(1, MAX_EPOCH_COUNT) = 3
    reduction_factor: float = Field(2.0, gt=1, le=1_000)


class SamplerSpec(Strict):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: count(0, MAX_TRIALS) = 6
    multivariate: bool = True
    constant_liar: bool = True


class ConfirmSpec(Strict):
    """Re-train the top-k configurations (ranked on val) with `seeds` new seeds each."""

    top_k: count(0, MAX_RETRIES) = 0  # 0: no confirmation
    seeds: count(1, MAX_RETRIES) = 3


class TeacherCacheSpec(Strict):
    """Frozen sources' logits on the training set, computed once per sweep storage and shared
    by every trial (used only by methods whose sources stay frozen and give only logits)."""

    enabled: bool = True
    #: None: one view per image per epoch, the views live training draws (exact); K: a fixed bank of
    #: K views per image (an approximation: the student sees only K augmentations of each image).
    views: count(1, MAX_RETRIES) | None = None
    dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0  # draws the bank's views (views: K only)


class LatencySpec(Strict):
    """How `cost_latency` (ms, the median of `repeats` timed forward passes after `warmup` untimed
    ones, on a batch of `batch_size` images) is measured: the same way for every trial, on the
    trial's device with its torch threads (one per CPU of `cpus_per_trial`)."""

    batch_size: count(1, 65_536) = 1
    warmup: count(0, MAX_RETRIES) = 10
    repeats: count(1, MAX_RETRIES) = 50


def seconds(value: Any) -> Any:
    """A duration in seconds: a number, or a string like "90s", "30m", "2h", "1.5d"."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, str):
        text = value.strip().lower()
        unit = DURATION_UNITS.get(text[-1:]) if text else None
        try:
            return float(text[:-1] if unit else text) * (unit or 1)
        except ValueError:
            raise ValueError(f"{value!r} is not a duration: give seconds or a number with s, m, h or d "
                             "(\"90s\", \"30m\", \"2h\")") from None
    return value


class WarmStartSpec(Strict):
    """Start from an earlier sweep in the same tracking store (`{from: NAME, top_k: K}`): with the
    same search space its finished trials join the study (TPE starts informed); otherwise its
    top K configurations, restricted to this space, are tried first."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    from_: str = Field(alias="from", min_length=1, max_length=100)
    top_k: count(1, MAX_RETRIES) = 5


class SweepSettings(Strict):
    num_trials: count(1, MAX_TRIALS) = 16
    max_concurrent: count(1, MAX_CONCURRENT) = 2
    cpus_per_trial: float = Field(1.0, gt=0, le=MAX_CPUS_PER_TRIAL)
    gpus_per_trial: float = Field(0.0, ge=0, le=MAX_GPUS_PER_TRIAL)  # > 0 trains on CUDA; fractions share a GPU
    #: Data-parallel workers (DDP ranks) per trial; the trial's CPUs and GPUs are shared equally
    #: among them (`resources_per_worker`), e.g. 2 GPUs per trial on 2 workers: one GPU each.
    workers_per_trial: count(1, MAX_WORKERS_PER_TRIAL) = 1
    #: CUDA only (CPU trials train in float32 whatever is set here).
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    channels_last: bool = False
    teacher_cache: TeacherCacheSpec = Field(default_factory=TeacherCacheSpec)
    seed: int = 0  # student initialisation and shuffling
    max_failures: count(0, MAX_RETRIES) = 0
    #: Seconds of a trial's training (or "30s", "5m") between its resumable checkpoints; 0: after
    #: every epoch. The last epoch and the epochs where the scheduler may stop a trial are always
    #: checkpointed. A trial resumed after a crash or an interruption retrains the epochs since its
    #: last checkpoint (at most this long); every epoch is still logged to MLflow once.
    checkpoint_interval: Annotated[float, BeforeValidator(seconds), Field(ge=0, le=MAX_INTERVAL_S)] = 60.0
    #: Seconds (or "30s") between a trial's results to Tune (its live progress, result.json,
    #: Optuna's intermediate values); 0: every epoch. Every checkpoint, the last epoch and the
    #: epochs where the scheduler may stop a trial are always reported, with `training_iteration`
    #: the epoch; MLflow gets every epoch whatever this is. Each result costs the driver, Ray and
    #: the trial some milliseconds of CPU: on epochs of a fraction of a second, a tenth of it.
    report_interval: Annotated[float, BeforeValidator(seconds), Field(ge=0, le=MAX_INTERVAL_S)] = 5.0
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    confirm: ConfirmSpec = Field(default_factory=ConfirmSpec)
    #: `[accuracy]`, or `[accuracy, params | flops | latency]` for a multi-objective search that
    #: also minimises the deployed student's cost (reported as a Pareto front); latency in ms.
    objectives: list[Literal["accuracy", "params", "flops", "latency"]] = Field(default_factory=lambda: ["accuracy"])
    latency: LatencySpec = Field(default_factory=LatencySpec)  # how every trial's latency is measured
    #: Configurations tried first (partial ones allowed: the sampler fills in the rest).
    initial_points: list[dict[str, Any]] = Field(default_factory=list)
    #: Seconds of running time (or "30m", "2h") after which no new trial starts: running trials
    #: finish, then the sweep ends as usual. Counted across resumes (time stopped does not count).
    time_budget: Annotated[float, BeforeValidator(seconds), Field(gt=0, le=MAX_TIME_BUDGET_S)] | None = None
    #: Start from an earlier sweep's trials: `{from: NAME, top_k: K}` (sweeps.warm_start).
    warm_start: WarmStartSpec | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_trial > 0 else "cpu"

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """One worker's Ray resources, `{"CPU": c, "GPU": g}` (GPU only when > 0): the trial's
        `cpus_per_trial` and `gpus_per_trial` divided by `workers_per_trial`."""
        cpus, gpus = self.cpus_per_trial / self.workers_per_trial, self.gpus_per_trial / self.workers_per_trial
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    @property
    def cost(self) -> str | None:
        """The cost objective of a multi-objective sweep, else None."""
        return self.objectives[1] if len(self.objectives) > 1 else None

    @field_validator("cpus_per_trial", "gpus_per_trial")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        # Ray's rule: a fraction shares one CPU or GPU; more than one must be whole ones.
        if value > 1 and not float(value).is_integer():
            raise ValueError(f"more than 1 must be a whole number (Ray shares only single units), got {value}")
        return value

    @model_validator(mode="after")
    def _worker_shares(self) -> SweepSettings:
        gpus = self.resources_per_worker.get("GPU", 0.0)
        if self.workers_per_trial > 1 and gpus and not (gpus >= 1 and gpus.is_integer()):
            raise ValueError(
                f"gpus_per_trial {self.gpus_per_trial:g} on {self.workers_per_trial} workers_per_trial gives each "
                f"worker {gpus:g} GPUs: NCCL runs one rank per GPU, so each worker needs whole GPUs; make "
                "gpus_per_trial a multiple of workers_per_trial")
        for key, share in self.resources_per_worker.items():
            if share > 1 and not share.is_integer():
                field = "cpus_per_trial" if key == "CPU" else "gpus_per_trial"
                raise ValueError(
                    f"{field} {getattr(self, field):g} on {self.workers_per_trial} workers_per_trial gives each worker "
                    f"{share:g} {key}s: more than 1 must be a whole number (Ray shares only single units); "
                    f"make {field} a multiple of workers_per_trial")
        return self

    @model_validator(mode="after")
    def _objectives(self) -> SweepSettings:
        if not self.objectives or self.objectives[0] != "accuracy" or len(self.objectives) > 2 \
                or "accuracy" in self.objectives[1:]:
            raise ValueError("objectives: [accuracy] or [accuracy, params | flops | latency]")
        if self.cost and self.scheduler.type == "asha":
            raise ValueError("a multi-objective sweep cannot use ASHA (it stops trials on one metric): "
                             "set scheduler: {type: none}")
        return self
