"""The per-model policy: one TOML file per model, validated with pydantic.

Unknown keys are errors (a typo must never silently become a default). Every section but
``[model]`` is optional and has defaults; the trigger and gate keys keep the seed article's
names and defaults, so its decision engine is a reference for ours.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config.durations import Duration
from config.keys import MODEL_NAME_PATTERN

log = structlog.get_logger(__name__)

Task = Literal["binary", "multiclass", "regression"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    name: str = Field(min_length=1, pattern=MODEL_NAME_PATTERN)
    """At most 128 characters, as event subjects (every event of the model carries it)."""
    task: Task = "binary"
    target: str = "target"


class DataSection(_Section):
    source: str = ""
    """A path glob (``data/churn/*.parquet``) or URI of Parquet/CSV files, or a SQLAlchemy
    database URL (with the ``sql`` extra) read with ``query``."""
    query: str = ""
    """For a database source: SQL with ``:start``/``:end`` bound to the window, or ``table:NAME``."""
    time_column: str = "timestamp"
    window: Duration = timedelta(days=90)
    """Training window: rows newer than ``now - window``."""
    window_from_drift_onset: bool = False
    """Train only on data since the detected drift onset (when the decision knows it)."""
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """The newest slice of the window, by time, held out as the test set."""
    min_rows: int = Field(200, ge=1)
    features: list[str] = []
    """Feature columns; empty means every column but the target and the time column."""
    categorical: list[str] = []
    """Columns to treat as categorical even when numeric; strings are categorical anyway."""
    max_null_rate: float = Field(0.2, ge=0, le=1)
    max_null_rate_increase: float = Field(0.1, ge=0, le=1)


class TriggersSection(_Section):
    # The seed's four, with its defaults.
    max_model_age_days: float = Field(30, ge=0)
    drift_threshold: float = Field(0.15, ge=0)
    performance_drop_threshold: float = Field(0.03, ge=0)
    new_data_threshold: int = Field(50000, ge=0)
    # Ours.
    schedule: str = ""
    """Optional cron ("0 3 * * *") or interval ("24h") that emits ``schedule.tick`` events."""
    drift_persistence_k: int = Field(1, ge=1, le=50)
    drift_persistence_n: int = Field(1, ge=1, le=50)  # the decision worker keeps the last 50 drift scores
    """Fire data drift only when it held in k of the last n observations (1 of 1 = off)."""
    min_labeled_samples: int = Field(0, ge=0)
    """Ignore a performance drop measured on fewer labeled samples than this."""
    use_confidence_interval: bool = True
    """Ignore a performance drop that lies within the metric's confidence interval."""
    concept_drift_threshold: float = Field(0.2, ge=0)
    concept_drift_metric: Literal["psi", "js"] = "psi"
    upstream_change: bool = True
    debounce_quiet: Duration = timedelta(seconds=30)
    """Decide once signals for a model have been quiet this long..."""
    debounce_max_wait: Duration = timedelta(minutes=5)
    """...or once the first undecided signal is this old, whichever comes first."""
    cooldown: Duration = timedelta(hours=6)
    """No new low/medium-urgency training this long after the last one."""
    max_trainings_per_day: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _k_le_n(self) -> "TriggersSection":
        if self.drift_persistence_k > self.drift_persistence_n:
            raise ValueError("drift_persistence_k must not exceed drift_persistence_n")
        return self


class FeatureDrift(_Section):
    test: Literal["auto", "ks", "chisquare", "z", "wasserstein", "jensenshannon", "psi"] = "auto"
    threshold: float | None = Field(None, ge=0)
    importance: float = Field(1.0, ge=0)


class DriftSection(_Section):
    method: Literal["auto", "ks", "wasserstein", "psi"] = "auto"
    """"auto" picks the test per feature from its kind and the reference size."""
    small_sample_size: int = Field(1000, ge=1)
    """References up to this many rows use statistical tests, larger ones distances."""
    p_value_threshold: float = Field(0.05, gt=0, lt=1)
    distance_threshold: float = Field(0.1, ge=0)
    psi_threshold: float = Field(0.2, ge=0)
    dataset_drift_share: float = Field(0.5, ge=0, le=1)
    missing_rate_threshold: float = Field(0.1, ge=0, le=1)
    weight_by_importance: bool = False
    features: dict[str, FeatureDrift] = {}
    monitor_interval: Duration = timedelta(hours=1)


class SearchSection(_Section):
    method: Literal["halving", "random", "grid", "none"] = "halving"
    space: dict[str, Any] = {}
    """Parameter -> list of values, or {"uniform"|"loguniform"|"randint" = [low, high]}."""
    n_candidates: int = Field(8, ge=1)
    cv: int = Field(3, ge=2)
    scoring: str = ""
    """A scikit-learn scorer name; empty means the task's primary metric."""
    random_state: int = 0
    n_jobs: int = 1


class TrainingSection(_Section):
    estimator: str = "sklearn.ensemble.HistGradientBoostingClassifier"
    """Import path of a scikit-learn-API class, or ``package.module:build`` returning one."""
    params: dict[str, Any] = {}
    search: SearchSection = SearchSection()
    random_state: int = 0


class GateSection(_Section):
    # The seed's five, with its defaults.
    min_accuracy: float = Field(0.85, ge=0)
    """Minimum of the primary metric (accuracy for classifiers, R² for regression)."""
    max_regression: float = Field(0.02, ge=0)
    min_prediction_correlation: float = Field(0.8, ge=-1, le=1)
    max_latency_p99_ms: float = Field(50, gt=0)
    max_model_size_mb: float = Field(500, gt=0)
    # Ours.
    primary_metric: str = ""
    """"accuracy"/"f1_weighted"/"roc_auc" for classifiers, "r2"/"neg_rmse" for regression."""
    min_throughput_rows_per_s: float = Field(1000, ge=0)
    regression_alpha: float = Field(0.05, gt=0, lt=1)
    """Significance of the paired regression test (McNemar / bootstrap)."""
    slice_feature: str = ""
    max_slice_regression: float = Field(0.05, ge=0)
    max_calibration_error: float = Field(0.1, ge=0, le=1)
    disabled: list[str] = []
    """Checks to skip, by name."""


class Phase(_Section):
    name: str
    traffic: float = Field(ge=0, le=100)
    """Percent of live traffic served by the candidate (0 = shadow: mirrored only)."""
    min_duration: Duration = timedelta(minutes=15)
    min_requests: int = Field(200, ge=0)
    min_labeled: int = Field(0, ge=0)
    max_wait: Duration | None = None


def _default_phases() -> list[Phase]:
    return [
        Phase(name="shadow", traffic=0, min_duration=timedelta(minutes=60), min_requests=500),
        Phase(name="canary", traffic=5, min_duration=timedelta(minutes=30), min_requests=200, min_labeled=100),
        Phase(name="25%", traffic=25, min_duration=timedelta(minutes=15), min_requests=500, min_labeled=200),
        Phase(name="50%", traffic=50, min_duration=timedelta(minutes=15), min_requests=500, min_labeled=200),
        Phase(name="100%", traffic=100, min_duration=timedelta(minutes=15), min_requests=500, min_labeled=200),
    ]


class RolloutSection(_Section):
    phases: list[Phase] = Field(default_factory=_default_phases, min_length=1)
    max_wait: Duration = timedelta(hours=2)
    """Longest a phase waits for evidence before ``on_insufficient_evidence`` applies."""
    on_insufficient_evidence: Literal["pause", "abort"] = "pause"
    min_agreement: float = Field(0.9, ge=0, le=1)
    """Shadow: minimum prediction agreement (classes) or score correlation with production."""
    max_score_psi: float = Field(0.25, ge=0)
    max_error_rate_increase: float = Field(0.01, ge=0)
    max_latency_p99_ratio: float = Field(1.5, gt=0)
    max_accuracy_drop: float = Field(0.02, ge=0)
    """Largest accuracy loss against production tolerated on delayed labels."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """False-rollback rate of the sequential accuracy test."""

    @model_validator(mode="after")
    def _phases_grow(self) -> "RolloutSection":
        traffic = [p.traffic for p in self.phases]
        if traffic != sorted(traffic):
            raise ValueError("rollout phases must not decrease traffic")
        if len({p.name for p in self.phases}) != len(self.phases):
            raise ValueError("rollout phase names must be unique")
        return self


class Policy(_Section):
    model: ModelSection
    data: DataSection = DataSection()
    triggers: TriggersSection = TriggersSection()
    drift: DriftSection = DriftSection()
    training: TrainingSection = TrainingSection()
    gate: GateSection = GateSection()
    rollout: RolloutSection = RolloutSection()

    @property
    def name(self) -> str:
        return self.model.name


class PolicyError(ValueError):
    """A policy file that cannot be used; ``str()`` is one line naming the problem."""


def _describe(error: ValidationError, source: str) -> str:
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


RETIRED_KEYS = {
    ("rollout", "tick"): "every rollout advances on the rollout workers' tick, RETRAIN_ROLLOUT_TICK",
}
"""Keys earlier versions accepted without using them: dropped with a warning, so those policies still load."""


def policy_from_dict(data: dict[str, Any], source: str = "policy") -> Policy:
    for (section, key), instead in RETIRED_KEYS.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            data = {**data, section: {k: v for k, v in data[section].items() if k != key}}
            log.warning("policy.retired_key_ignored", source=source, key=f"{section}.{key}", instead=instead)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_describe(exc, source)) from None


def load_policy(path: str | Path) -> Policy:
    """Read and validate one policy file; any unusable file raises :class:`PolicyError` with a one-line reason."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"{path}: no such policy file") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: {not_utf8(exc)}") from None
    return policy_from_dict(data, str(path))


def not_utf8(exc: UnicodeDecodeError) -> str:
    """One line saying where a file stopped being UTF-8 text."""
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
