"""Typed configuration: `config.toml`, then `STREAM_CL_SECTION__KEY`, then `--set section.key=value`.

Every key has a typed default here; `config.toml` at the repository root documents each one.
An unknown key or a value of the wrong type raises `ConfigError` naming the key; the CLI maps
that to exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_cl.cpus import cpu_affinity_problem

ENV_PREFIX = "STREAM_CL_"


class ConfigError(ValueError):
    """A bad configuration value; `key` is the dotted key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


@dataclass
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "stream_cl.samples"
    group_id: str = "stream_cl"
    dead_letter_topic: str = "stream_cl.dead_letters"
    predictions_topic: str = ""
    auto_offset_reset: str = "earliest"
    max_poll_records: int = 2000
    poll_timeout_ms: int = 100
    max_poll_interval_ms: int = 10_000
    session_timeout_ms: int = 10_000
    fetch_max_bytes: int = 52_428_800
    max_partition_fetch_bytes: int = 10_485_760
    commit_interval_s: float = 5.0
    fetch_in_subprocess: bool = True  # fetch + decode in a child process (stream_cl/ingest/fetcher.py)

    def validate(self) -> None:
        _choice("kafka.auto_offset_reset", self.auto_offset_reset, ("earliest", "latest"))
        _positive("kafka.max_poll_records", self.max_poll_records)
        _positive("kafka.max_poll_interval_ms", self.max_poll_interval_ms)


@dataclass
class ModelConfig:
    device: str = "auto"
    backbone: str = "mlp"
    input_dim: int = 0
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    seed: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    max_classes: int = 1000
    torch_threads: int = 1

    def validate(self) -> None:
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("model.device", f"expected 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _choice("model.backbone", self.backbone, ("mlp", "cnn"))
        _choice("model.optimizer", self.optimizer, ("adam", "sgd"))
        if self.input_dim < 0:
            raise ConfigError("model.input_dim", "must be >= 0 (0 = taken from the first sample)")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ConfigError(
                "model.hidden", f"expected a non-empty list of positive widths, got {self.hidden}"
            )
        _positive("model.lr", self.lr)
        _positive("model.batch_size", self.batch_size)
        _positive("model.max_classes", self.max_classes)
        if self.torch_threads < 0:
            raise ConfigError(
                "model.torch_threads", f"must be >= 0 (0 = torch's default), got {self.torch_threads}"
            )


@dataclass
class ModelsConfig:
    """`[models]`: one model for the stream, or one per Kafka message key (see learn/keyed.py)."""

    per_key: bool = False
    max_keys: int = 100

    def validate(self) -> None:
        _positive("models.max_keys", self.max_keys)


@dataclass
class StrategyConfig:
    """`[strategy]`: checked against the registry by `stream_cl.strategies.check_config`."""

    name: str = "eidetic"
    head: str = "ls"
    head_options: dict[str, Any] = field(default_factory=dict)
    loss: str = "ce"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BoundariesConfig:
    """Task-boundary evidence, guard rails and recurring-task matching (see `stream_cl.detect.boundaries`).

    Detector names and parameters are checked against river when the detector is built (importing
    river here would slow every CLI command).
    """

    explicit: bool = True
    new_class: bool = True
    drift: bool = True
    min_task_length: int = 50
    drift_detector: str = "PageHinkley"
    drift_signal: str = "auto"
    drift_params: dict[str, Any] = field(default_factory=dict)
    drift_warmup: int = 100
    drift_cooldown: int = 100
    recurring: str = "both"
    recurring_window: int = 32
    recurring_threshold: float = 0.3

    def validate(self) -> None:
        for key in ("min_task_length", "drift_warmup", "drift_cooldown"):
            if getattr(self, key) < 0:
                raise ConfigError(f"boundaries.{key}", f"must be >= 0, got {getattr(self, key)}")
        _choice("boundaries.drift_signal", self.drift_signal, ("auto", "loss", "error"))
        _choice("boundaries.recurring", self.recurring, ("off", "classes", "inputs", "both"))
        _positive("boundaries.recurring_window", self.recurring_window)
        _positive("boundaries.recurring_threshold", self.recurring_threshold)


@dataclass
class EvaluationConfig:
    holdout_fraction: float = 0.1
    reservoir_size: int = 200
    every_samples: int = 1000
    every_s: float = 30.0
    stability_window: int = 500
    task_hint: bool = False
    history: int = 1000
    max_cpu_share: float = 0.05
    keyed_reservoir_size: int = 50  # models.per_key: held-out samples per task and model
    keyed_max_samples: int = 20000  # models.per_key: held-out samples over all models (then none more)

    def validate(self) -> None:
        _positive("evaluation.keyed_reservoir_size", self.keyed_reservoir_size)
        _positive("evaluation.keyed_max_samples", self.keyed_max_samples)
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(
                "evaluation.holdout_fraction", f"must be in [0, 1), got {self.holdout_fraction}"
            )
        _positive("evaluation.reservoir_size", self.reservoir_size)
        _positive("evaluation.history", self.history)
        if self.every_samples < 0 or self.every_s < 0:
            raise ConfigError(
                "evaluation.every_samples" if self.every_samples < 0 else "evaluation.every_s",
                "must be >= 0 (0 = off)",
            )
        if not 0.0 <= self.max_cpu_share <= 1.0:
            raise ConfigError(
                "evaluation.max_cpu_share", f"must be in [0, 1] (0 or 1 = no limit), got {self.max_cpu_share}"
            )


@dataclass
class LearnerConfig:
    snapshot_every_steps: int = 5
    snapshot_every_ms: int = 500
    snapshot_min_interval_ms: int = 50
    prequential_window: int = 1000
    gil_switch_interval_us: int = 0  # opt-in process tuning (runtime/tuning.py); 0 = Python's own
    cpu_affinity: str = "off"  # "auto" or a CPU list pins the learner thread (runtime/affinity.py)

    def validate(self) -> None:
        _positive("learner.snapshot_every_steps", self.snapshot_every_steps)
        problem = cpu_affinity_problem(self.cpu_affinity)
        if problem is not None:
            raise ConfigError("learner.cpu_affinity", problem)
        _positive("learner.prequential_window", self.prequential_window)
        if self.gil_switch_interval_us < 0:
            raise ConfigError(
                "learner.gil_switch_interval_us",
                f"must be >= 0 (0 = Python's default), got {self.gil_switch_interval_us}",
            )
        if self.snapshot_min_interval_ms < 0:
            raise ConfigError(
                "learner.snapshot_min_interval_ms",
                f"must be >= 0 (0 = no floor), got {self.snapshot_min_interval_ms}",
            )


@dataclass
class ServeConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 7070
    token: str = ""
    max_frame_bytes: int = 1_048_576
    max_batch: int = 256
    batch_wait_ms: float = 1.0
    max_connections: int = 256
    idle_timeout_s: float = 300.0
    read_timeout_s: float = 10.0
    tls_cert: str = ""
    tls_key: str = ""
    max_requests_per_s: float = 0.0
    http_enabled: bool = True  # the OIP v2 REST front (docs/http-protocol.md), same loop and limits
    http_port: int = 8000
    model_name: str = "stream_cl"  # the OIP v2 model name of an unkeyed server

    def validate(self) -> None:
        _port("serve.port", self.port)
        _port("serve.http_port", self.http_port)
        if not self.model_name or "/" in self.model_name:
            raise ConfigError("serve.model_name", f"must be non-empty without '/', got {self.model_name!r}")
        _positive("serve.max_frame_bytes", self.max_frame_bytes)
        _positive("serve.max_batch", self.max_batch)
        _positive("serve.max_connections", self.max_connections)
        if self.max_requests_per_s < 0:
            raise ConfigError(
                "serve.max_requests_per_s", f"must be >= 0 (0 = no limit), got {self.max_requests_per_s}"
            )
        self._validate_tls()

    def _validate_tls(self) -> None:
        """Fail at load time, naming the key, rather than when the server first binds.

        TLS is all-or-nothing: a certificate without its key (or the reverse) is a mistake, never a
        request for plain TCP, so it is refused instead of silently serving unencrypted.
        """
        if not self.tls_cert and not self.tls_key:
            return
        for key, other, value in (
            ("serve.tls_cert", "serve.tls_key", self.tls_cert),
            ("serve.tls_key", "serve.tls_cert", self.tls_key),
        ):
            if not value:
                raise ConfigError(key, f"is empty but {other} is set: give both (TLS) or neither (plain TCP)")
            try:
                with open(value, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise ConfigError(key, f"cannot read {value!r}: {e.strerror or e}") from None
        import ssl  # only configs that enable TLS pay for the import

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(
                "serve.tls_cert", f"{self.tls_cert!r} with key {self.tls_key!r} is not a usable pair: {e}"
            ) from None


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108
    max_task_labels: int = 64
    max_model_labels: int = 32  # models.per_key: models with series of their own (all are in the aggregate)

    def validate(self) -> None:
        _port("metrics.port", self.port)
        _positive("metrics.max_task_labels", self.max_task_labels)
        _positive("metrics.max_model_labels", self.max_model_labels)


@dataclass
class CheckpointConfig:
    enabled: bool = True
    dir: str = "checkpoints"
    every_samples: int = 10_000
    every_s: float = 60.0
    at_boundary: bool = True
    min_interval_s: float = 1.0  # scheduled writes at most this often; closer requests share one
    keep: int = 3
    background: bool = True  # scheduled writes on a writer thread (stream_cl/learn/checkpointing.py)

    def validate(self) -> None:
        _positive("checkpoint.keep", self.keep)
        if self.every_samples < 0:
            raise ConfigError("checkpoint.every_samples", f"must be >= 0 (0 = off), got {self.every_samples}")
        if self.every_s < 0:
            raise ConfigError("checkpoint.every_s", f"must be >= 0 (0 = off), got {self.every_s}")
        if self.min_interval_s < 0:
            raise ConfigError(
                "checkpoint.min_interval_s", f"must be >= 0 (0 = no floor), got {self.min_interval_s}"
            )


@dataclass
class PublishConfig:
    """`[publish]`: the learner's snapshots on a compacted Kafka topic, for `serve --follow` replicas."""

    topic: str = ""
    interval_s: float = 1.0
    chunk_bytes: int = 524_288
    max_snapshot_bytes: int = 268_435_456
    partitions: int = 1

    def validate(self) -> None:
        if self.interval_s < 0:
            raise ConfigError(
                "publish.interval_s", f"must be >= 0 (0 = every snapshot), got {self.interval_s}"
            )
        _positive("publish.chunk_bytes", self.chunk_bytes)
        _positive("publish.max_snapshot_bytes", self.max_snapshot_bytes)
        _positive("publish.partitions", self.partitions)


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "auto"

    def validate(self) -> None:
        _choice("log.level", self.level, ("debug", "info", "warning", "error"))
        _choice("log.format", self.format, ("auto", "json", "console"))


@dataclass
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    boundaries: BoundariesConfig = field(default_factory=BoundariesConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            check = getattr(section, "validate", None)
            if check is not None:
                check()
        if self.models.per_key and not self.checkpoint.enabled:
            raise ConfigError(
                "models.per_key",
                "needs checkpoint.enabled = true: per-key models move between daemons through the checkpoint store",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load `path` (if given), then environment variables, then `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError("--config", f"file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"{p} is not valid TOML: {e}") from e
    env = os.environ if env is None else env
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(raw, dotted, value, from_text=True)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value")
        dotted, value = item.split("=", 1)
        _set_dotted(raw, dotted.strip(), value, from_text=True)
    return build(Config, raw, "").validate()


class _Text(str):
    """A value that came from the environment or --set: parsed against the target type."""


def _set_dotted(raw: dict[str, Any], dotted: str, value: str, from_text: bool) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(dotted, "expected section.key")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(dotted, f"'{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = _Text(value) if from_text else value


def build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and mistyped values."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "<root>", f"expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(dotted, f"unknown key (valid keys here: {valid})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build(tp, value, key)
    origin = typing.get_origin(tp)
    if isinstance(value, _Text):
        return _parse_text(tp, str(value), key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {k: (str(v) if isinstance(v, _Text) else v) for k, v in value.items()}
    elif origin in (typing.Union, types.UnionType) or tp is Any:
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _parse_text(tp: Any, text: str, key: str) -> Any:
    """Parse a string from the environment or --set into `tp` (TOML syntax for lists)."""
    if tp is str:
        return text
    try:
        parsed = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if typing.get_origin(tp) is dict:
            raise ConfigError(key, f"expected an inline table, got {text!r}") from None
        raise ConfigError(key, f"expected {_type_name(tp)}, got {text!r}") from None
    return _coerce(tp, parsed, key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"expected one of {', '.join(choices)}; got {value!r}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _port(key: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(key, f"must be a TCP port (0-65535, 0 = any free port), got {value}")
