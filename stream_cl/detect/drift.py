"""Drift detectors (river's, and any registered with `register_detector`) behind one small
wrapper: built from config, fed a per-sample signal.

Why a wrapper rather than river's objects as they are:
- river's `drift_detected` holds for one update only, and a detector resets itself on the update
  after it fired; `DriftMonitor.update` returns the firing so the caller records it at once.
- Two-sided detectors (ADWIN, KSWIN, PageHinkley in mode "both") also fire when the error *falls*,
  which is what a model learning a task does; only a rise means the stream moved on, so their
  firings pass a rise check (the recent values' mean above the earlier ones').
- river has broken old pickles between releases, so a checkpoint holds the detector's name, its
  parameters and the values fed since its last reset; restoring rebuilds the detector from the
  parameters and replays the values (exactly the same state, in whatever river version is
  installed). The replay log is bounded by `HISTORY_LIMIT`: beyond it the oldest values go and the
  restored detector is the one that would have started `HISTORY_LIMIT` values ago.

river is imported only when a detector is built (`import river.drift` takes ~1 s).
"""

from __future__ import annotations

import importlib
import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from stream_cl.config import ConfigError

HISTORY_LIMIT = 20_000
RISE_WINDOW = 32  # recent values compared with the earlier ones by the rise check


class DriftDetector(Protocol):
    """What a detector must do to be registered: river's drift-detector interface. river's own
    detectors have it; so can any other class (`register_detector`)."""

    drift_detected: bool

    def update(self, x: float) -> Any: ...


def _always(params: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class DetectorSpec:
    """A drift detector as stream_cl uses it: river's, or any class with `DriftDetector`'s interface.

    `defaults` are stream_cl's values over river's own, tuned for the per-sample loss or error of a
    model learning online (see `stream-cl bench boundaries`); `boundaries.drift_params` overrides
    them. `ranges` maps a parameter to the kind of value it takes, for errors that name the key.
    """

    module: str
    binary: bool
    defaults: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, str] = field(default_factory=dict)
    feed_correct: bool = False  # FHDDM fires when its input's mean *falls* (MOA feeds it accuracy)
    class_name: str = ""  # the class in `module`; "" = the registry name
    # whether, with these parameters, it fires only when its input rises (else a rise check follows)
    rises_only: Callable[[dict[str, Any]], bool] = _always


DETECTORS: dict[str, DetectorSpec] = {
    "ADWIN": DetectorSpec(
        "river.drift.adwin",
        binary=False,
        defaults={"delta": 1e-5, "clock": 8},
        rises_only=lambda params: False,
        ranges={
            "delta": "unit",
            "clock": "count",
            "max_buckets": "count",
            "min_window_length": "count",
            "grace_period": "count",
        },
    ),
    "PageHinkley": DetectorSpec(
        "river.drift.page_hinkley",
        binary=False,
        defaults={"mode": "up", "delta": 0.1, "threshold": 40.0},
        rises_only=lambda params: params.get("mode", "both") == "up",
        ranges={
            "min_instances": "count",
            "delta": "nonneg",
            "threshold": "pos",
            "alpha": "unit]",
            "mode": "mode",
        },
    ),
    "KSWIN": DetectorSpec(
        "river.drift.kswin",
        binary=False,
        defaults={"alpha": 1e-5, "seed": 0},
        rises_only=lambda params: False,
        ranges={"alpha": "unit", "window_size": "count", "stat_size": "count"},
    ),
    "DDM": DetectorSpec(
        "river.drift.binary.ddm",
        binary=True,
        ranges={"warm_start": "count", "warning_threshold": "pos", "drift_threshold": "pos"},
    ),
    "EDDM": DetectorSpec(
        "river.drift.binary.eddm",
        binary=True,
        ranges={"warm_start": "count", "alpha": "unit]", "beta": "unit]"},
    ),
    "FHDDM": DetectorSpec(
        "river.drift.binary.fhddm",
        binary=True,
        feed_correct=True,
        ranges={"sliding_window_size": "count", "confidence_level": "unit", "short_window_size": "count"},
    ),
    "HDDMA": DetectorSpec(
        "river.drift.binary.hddm_a",
        binary=True,
        rises_only=lambda params: not params.get("two_sided_test", False),
        ranges={"drift_confidence": "unit", "warning_confidence": "unit"},
    ),
    "HDDMW": DetectorSpec(
        "river.drift.binary.hddm_w",
        binary=True,
        rises_only=lambda params: not params.get("two_sided_test", False),
        ranges={"drift_confidence": "unit", "warning_confidence": "unit", "lambda_val": "unit]"},
    ),
}

_RANGE_TEXT = {
    "unit": "a number in (0, 1)",
    "unit]": "a number in (0, 1]",
    "pos": "a number > 0",
    "nonneg": "a number >= 0",
    "count": "an integer >= 1",
}


def register_detector(name: str, spec: DetectorSpec) -> None:
    """Make `name` a valid `boundaries.drift_detector`: the class `spec.class_name` (or `name`) in
    `spec.module`, built with `spec.defaults` over its own and `boundaries.drift_params` over both."""
    DETECTORS[name] = spec


def canonical_name(name: str) -> str:
    """The registry spelling of a detector name, matched case-insensitively; ConfigError if unknown."""
    for known in DETECTORS:
        if known.lower() == name.lower():
            return known
    raise ConfigError(
        "boundaries.drift_detector", f"unknown detector {name!r}; valid: {', '.join(DETECTORS)}"
    )


def resolve_signal(name: str, signal: str) -> str:
    """`auto` becomes `error` for binary detectors and `loss` for the others."""
    if DETECTORS[name].binary:
        if signal == "loss":
            raise ConfigError(
                "boundaries.drift_signal", f"{name} takes a binary input: use 'error' (or 'auto'), not 'loss'"
            )
        return "error"
    return "loss" if signal == "auto" else signal


def detector_params(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """stream_cl's defaults for `name` with `overrides` applied, every value checked.

    Raises ConfigError naming `boundaries.drift_params.KEY` for an unknown parameter, a value of the
    wrong type or out of range, and `boundaries.drift_params` when river rejects the combination.
    """
    spec = DETECTORS[name]
    cls = _detector_class(name)
    signature = inspect.signature(cls.__init__).parameters
    valid = [p for p in signature if p not in ("self", "window")]
    params = dict(spec.defaults)
    for key, value in overrides.items():
        dotted = f"boundaries.drift_params.{key}"
        if key not in valid:
            raise ConfigError(dotted, f"not a parameter of {name} (valid: {', '.join(valid)})")
        params[key] = _check_value(dotted, value, signature[key].default, spec.ranges.get(key))
    try:
        cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError("boundaries.drift_params", f"{name} rejects {params}: {e}") from e
    return params


def _check_value(key: str, value: Any, default: Any, kind: str | None) -> Any:
    expected = int if default is None else type(default)  # optional ints: KSWIN's seed, FHDDM's short window
    if default is None and value is None:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(key, f"expected {expected.__name__}, got {type(value).__name__} {value!r}")
    if kind == "mode" and value not in ("up", "down", "both"):
        raise ConfigError(key, f"expected one of up, down, both; got {value!r}")
    if kind not in (None, "mode") and not _in_range(value, kind):
        raise ConfigError(key, f"expected {_RANGE_TEXT[kind]}, got {value!r}")
    return value


def _in_range(value: float, kind: str) -> bool:
    return {
        "unit": 0 < value < 1,
        "unit]": 0 < value <= 1,
        "pos": value > 0,
        "nonneg": value >= 0,
        "count": value >= 1,
    }[kind]


def _detector_class(name: str) -> Any:
    spec = DETECTORS[name]
    return getattr(importlib.import_module(spec.module), spec.class_name or name)


def rises_only(name: str, params: dict[str, Any]) -> bool:
    """Whether the configured detector can fire only on a rise of the error (no rise check needed)."""
    return DETECTORS[name].rises_only(params)


class DriftMonitor:
    """One drift detector fed one value per sample; `update` returns True when it fired on a rise."""

    def __init__(self, name: str, params: dict[str, Any], signal: str) -> None:
        self.name = name
        self.params = dict(params)
        self.signal = signal  # "loss" | "error"
        self._cls = _detector_class(name)
        self._feed_correct = DETECTORS[name].feed_correct
        self._binary = DETECTORS[name].binary
        self._rises_only = rises_only(name, self.params)
        self.reset()

    def reset(self) -> None:
        """A fresh detector (at a boundary: the old task's level says nothing about the new one)."""
        self.detector = self._cls(**self.params)
        self.history: deque[float] = deque(maxlen=HISTORY_LIMIT)  # values since the detector's last reset
        self.fed = 0  # values fed since `reset` (warm-up counts these)

    def value(self, loss: float, correct: bool) -> float:
        """The number this monitor's detector takes for one sample."""
        if self.signal == "loss":
            return float(loss)
        if self._feed_correct:
            return 1.0 if correct else 0.0
        return 0.0 if correct else 1.0

    def update(self, x: float) -> bool:
        """Feed one value; True when the detector fired and (for two-sided ones) the error rose."""
        self._feed(x)
        self.fed += 1
        return bool(self.detector.drift_detected) and (self._rises_only or self._rose())

    def _feed(self, x: float) -> None:
        if self.detector.drift_detected:  # river resets itself on this update: mirror it
            self.history.clear()
        self.history.append(x)
        self.detector.update(int(x) if self._binary else x)

    def _rose(self) -> bool:
        values = list(self.history)
        recent = min(RISE_WINDOW, len(values) // 2)
        if recent == 0:
            return False
        before = values[:-recent]
        return sum(values[-recent:]) / recent > sum(before) / len(before)

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.name,
            "params": dict(self.params),
            "signal": self.signal,
            "history": list(self.history),
            "fed": self.fed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Rebuild from saved parameters and values; False (left fresh) if they were another detector's."""
        self.reset()
        same = (state["detector"], state["params"], state["signal"]) == (self.name, self.params, self.signal)
        if not same:
            return False
        for x in state["history"]:
            self._feed(x)
        self.fed = state["fed"]
        return True
