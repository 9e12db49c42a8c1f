"""deploy/: compose, Dockerfile, Kubernetes, Prometheus rules and the Grafana dashboard, against a live daemon.

The static checks parse each file and verify what it points at (files, CLI flags, config keys, ports).
The live checks run the daemon on the session broker, learning split-mnist with fine-tuning
(class-incremental: each new pair of classes overwrites the last, so forgetting is forced), and
point a real Prometheus at it (Debian's `prometheus` package, installed by .ci/run; a missing
binary fails these tests, it never skips them). Every dashboard query and every alert expression
is then asked of Prometheus's HTTP API the way Grafana and the rule evaluator ask it.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import msgpack
import pytest
import yaml
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, kafka_overrides, wait_until

from stream_cl.cli import build_parser, main
from stream_cl.config import Config, load_config
from stream_cl.runtime.daemon import Daemon, checkpoint_dir
from stream_cl.runtime.replica import Replica
from stream_cl.serve.client import PredictionClient
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.datasets import BenchmarkStream, load_stream
from stream_cl.tools.producer import produce_stream

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream_cl.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
K8S = DEPLOY / "k8s" / "stream-cl.yaml"

# What Grafana substitutes before it sends a query, for a 1 s scrape interval.
GRAFANA_MACROS = {"$__rate_interval": "5s", "$__interval": "2s", "$job": ".+", "$instance": ".+"}
# Series Prometheus makes itself for every target; any other name must come from the daemon.
PROMETHEUS_SERIES = {"up"}
INVALID_MESSAGES = 3


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: `bash .ci/run` installs Debian's prometheus package (it must, for CI)"
    return path


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _k8s_docs() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(K8S.read_text())}


def _parses_as_cli(argv: list[str]) -> Any:
    """`argv` (after `stream-cl`) is accepted by the real argument parser: no misspelled flag ships."""
    return build_parser().parse_args(argv)


# -- the queries the dashboard and the rules send -------------------------------------------------
def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(where, PromQL after macro substitution, instant?) for every panel target and annotation."""
    out: list[tuple[str, str, bool]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                out.append(
                    (f"panel {panel['title']!r}", grafana_expr(target["expr"]), bool(target.get("instant")))
                )

    walk(dashboard["panels"])
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            out.append((f"annotation {annotation['name']!r}", grafana_expr(annotation["expr"]), False))
    return out


def grafana_expr(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(?=-?\d)")


def always_answering(expr: str) -> str:
    """`expr` with every comparison against a number made `bool`: 0/1 instead of filtering.

    Prometheus then returns a series whenever the expression *could* fire: its selectors match,
    and the two sides of each `and` share labels (a mismatch would make the alert never fire).
    """
    return _COMPARISON.sub(lambda m: f"{m.group(1)} bool ", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: `stream_cl_*` anywhere, and any other `name{...}`."""
    names = set(re.findall(r"\b(stream_cl_[a-z0-9_]+)\b", expr))
    return names | {n for n in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr)}


def exported_names(metrics_text: str) -> set[str]:
    """Every series name an exposition can hold, including families that have no child yet."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum"),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.add(family.name)
        names |= {family.name + s for s in suffixes.get(family.type, ())}
        names |= {sample.name for sample in family.samples}
    return names


# -- static checks ----------------------------------------------------------------------------------
def test_compose_parses_and_references_only_files_in_deploy() -> None:
    """Every bind mount and the Dockerfile the compose file names exist under deploy/; volumes are declared."""
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert {"kafka", "prometheus", "grafana", "stream-cl", "alertmanager", "alert-log"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    named_volumes = set(compose.get("volumes") or {})
    bind_mounts = []
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                assert path.is_relative_to(DEPLOY), f"{name} mounts {source}, outside deploy/"
                assert path.exists(), f"{name} mounts {source}, which does not exist"
                bind_mounts.append(path)
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
    alertmanager = DEPLOY / "alertmanager"
    assert {PROMETHEUS_YML, ALERTS_YML, DATASOURCE, DASHBOARD.parent} <= set(bind_mounts)
    assert {alertmanager / "alertmanager.yml", alertmanager / "webhook_log.py"} <= set(bind_mounts)
    build = services["stream-cl"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / "pyproject.toml").exists()
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_daemon_settings_are_valid_config() -> None:
    """The daemon's STREAM_CL_* variables are real config keys; it listens where Prometheus scrapes it."""
    compose = _load_yaml(COMPOSE)
    env = {k: str(v) for k, v in compose["services"]["stream-cl"]["environment"].items()}
    assert env["STREAM_CL_SERVE__TOKEN"].startswith("${STREAM_CL_TOKEN:?")  # required, never a default
    env["STREAM_CL_SERVE__TOKEN"] = "secret"
    config = load_config(None, [], env=env)
    assert config.kafka.bootstrap_servers == "kafka:9092"
    assert (config.serve.host, config.metrics.host) == ("0.0.0.0", "0.0.0.0")
    jobs = {job["job_name"]: job for job in _load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    (discovery,) = jobs["stream_cl"]["dns_sd_configs"]  # every scaled learner container
    assert (discovery["names"], discovery["port"]) == (["stream-cl"], config.metrics.port)
    producer = compose["services"]["producer"]
    assert _parses_as_cli(producer["command"]).command == "produce"


def test_dockerfile_copies_files_that_exist_and_runs_real_cli_commands() -> None:
    """COPY sources exist in the build context and pass the .dockerignore; CMD and HEALTHCHECK parse."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")]
    kept = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copies = [args.split()[:-1] for op, args in instructions if op == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
            assert source.rstrip("/") in kept, f"COPY {source}: excluded by Dockerfile.dockerignore"
    by_op = {op: args for op, args in instructions}
    entrypoint = json.loads(by_op["ENTRYPOINT"])
    assert entrypoint == ["stream-cl"]
    assert _parses_as_cli(json.loads(by_op["CMD"])).command == "run"
    healthcheck = json.loads(by_op["HEALTHCHECK"].split("CMD", 1)[1])
    assert healthcheck[0] == "stream-cl" and _parses_as_cli(healthcheck[1:]).health


LIVE, READY = "/v2/health/live", "/v2/health/ready"  # the OIP v2 health routes the probes GET


def test_kubernetes_manifest_is_consistent(tmp_path: Path) -> None:
    """One recreated replica, probes on real ports and CLI flags, its ConfigMap a valid config, scrape annotations right."""
    docs = _k8s_docs()
    assert set(docs) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    (tmp_path / "config.toml").write_text(docs["ConfigMap"]["data"]["config.toml"])
    config = load_config(tmp_path / "config.toml", [], env={})
    deployment = docs["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    pod = deployment["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics.port)
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "predict": config.serve.port,
        "http": config.serve.http_port,
        "metrics": config.metrics.port,
    }
    for probe, path in (("startupProbe", LIVE), ("livenessProbe", LIVE), ("readinessProbe", READY)):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    assert _parses_as_cli(container["args"]).command == "run"
    assert container["env"][0]["name"] == "STREAM_CL_SERVE__TOKEN"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["checkpoints"] == config.checkpoint.dir
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "checkpoints")["persistentVolumeClaim"]
    assert claim["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert {p["targetPort"] for p in docs["Service"]["spec"]["ports"]} <= set(ports)


def test_compose_file_matches_the_compose_specification() -> None:
    """deploy/docker-compose.yml validates against the Compose Specification's JSON schema."""
    check = Path(sys.executable).parent / "check-jsonschema"  # the dev extra's, with the schema vendored
    result = subprocess.run(
        [str(check), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_match_the_kubernetes_schemas() -> None:
    """Every built-in resource of deploy/k8s/*.yaml passes kubernetes-validate, strictly (no unknown field).

    The Prometheus Operator's kinds (monitoring.yaml) have no schema there; their fields are
    checked in tests/test_deploy_monitoring.py.
    """
    version = kubernetes_validate.latest_version()
    checked, operator = [], []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                operator.append(doc["kind"])
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked.append(f"{path.name}:{doc['kind']}")
    assert len(checked) >= 10
    assert sorted(operator) == ["PodMonitor", "PodMonitor", "PrometheusRule"]


def test_promtool_check_config_passes() -> None:
    """`promtool check config` accepts prometheus.yml, and with it alerts.yml."""
    result = subprocess.run(
        [_tool("promtool"), "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_passes() -> None:
    """`promtool check rules` accepts alerts.yml."""
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(ALERTS_YML)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_on_their_incident_and_not_on_its_look_alike() -> None:
    """`promtool test rules`: each alert on synthetic series (e.g. an idle topic is not a stuck learner)."""
    tests = DEPLOY / "prometheus" / "alerts_test.yml"
    result = subprocess.run([_tool("promtool"), "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = {rule["alert"] for rule in alert_rules()}
    cases = [case for test in _load_yaml(tests)["tests"] for case in test["alert_rule_test"]]
    assert {case["alertname"] for case in cases} == rules  # no rule without a unit test


def test_every_alert_has_a_firing_case_and_a_quiet_look_alike() -> None:
    """For each rule, alerts_test.yml makes it fire, and has series (or a time) where it must not.

    A look-alike is an evaluation that expects no alert, or an instance in a test's input series
    that the rule's expected alerts leave out (promtool then proves it stays quiet).
    """
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in _load_yaml(DEPLOY / "prometheus" / "alerts_test.yml")["tests"]:
        instances = {
            m.group(1) for s in test["input_series"] if (m := re.search(r'instance="([^"]+)"', s["series"]))
        }
        for case in test["alert_rule_test"]:
            expected = {a["exp_labels"]["instance"] for a in case.get("exp_alerts") or []}
            if expected:
                fired.add(case["alertname"])
            if not expected or instances - expected:
                quiet.add(case["alertname"])
    rules = {rule["alert"] for rule in alert_rules()}
    assert fired == rules, f"never fires in a test: {sorted(rules - fired)}"
    assert quiet == rules, f"no look-alike that stays quiet: {sorted(rules - quiet)}"


def test_down_alert_is_job_agnostic() -> None:
    """StreamClDown keys on stream_cl's own series, not on job names, so any scrape config gets it."""
    (down,) = [r for r in alert_rules() if r["alert"] == "StreamClDown"]
    assert "job=" not in down["expr"] and "job=~" not in down["expr"]
    assert "up == 0" in down["expr"] and "stream_cl_build_info" in down["expr"]


def _datasource_refs(node: Any, where: str = "dashboard") -> Iterator[tuple[str, Any]]:
    """Every `datasource` value anywhere in the dashboard JSON, with where it sits."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield where, value
            yield from _datasource_refs(value, f"{where}.{node.get('title', node.get('name', key))}")
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item, where)


def test_dashboard_json_parses_and_uses_the_provisioned_datasource() -> None:
    """The dashboard is valid JSON; its datasource variable offers the Prometheus Grafana provisions."""
    dashboard = json.loads(DASHBOARD.read_text())
    (provisioned,) = _load_yaml(DATASOURCE)["datasources"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == provisioned["type"] == "prometheus"
    assert provisioned["isDefault"]  # the variable's empty `current` falls back to it
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = {p["title"] for p in panels}
    assert {"Accuracy matrix R[i][j] (heatmap)", "Prediction latency", "Consumer lag", "Forgetting"} <= titles
    provider = _load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "stream_cl.yml")["providers"][
        0
    ]
    grafana = _load_yaml(COMPOSE)["services"]["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"] if v.startswith("./grafana/dashboards")}
    assert mounted == {provider["options"]["path"]}


# Series only a daemon with models.per_key exports; the live daemon here holds one model.
PER_KEY_ONLY = {
    "stream_cl_models",
    "stream_cl_model_handovers_total",
    "stream_cl_models_evaluated",
    "stream_cl_model_average_accuracy",
    "stream_cl_model_average_forgetting",
    "stream_cl_model_backward_transfer",
    "stream_cl_model_stability_gap",
    "stream_cl_model_accuracy_matrix",
}
# Series only strategies with a finite capacity (eidetic) export; the live daemon runs finetune.
CAPACITY_ONLY = {"stream_cl_free_capacity_ratio", "stream_cl_capacity_exhausted"}
ABSENT_HERE = PER_KEY_ONLY | CAPACITY_ONLY  # correctly empty on the live stack below


def test_dashboard_imports_into_a_grafana_whose_prometheus_has_another_name() -> None:
    """No datasource uid or name is baked in: everything queries `${datasource}`, a datasource variable.

    Imported into a Grafana whose Prometheus is called, say, "Mimir (prod)" with a random uid, the
    variable lists that datasource (type prometheus) and every panel, target, annotation and query
    variable follows it; nothing refers to the compose stack's provisioned uid or name.
    """
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    (provisioned,) = _load_yaml(DATASOURCE)["datasources"]
    assert provisioned["uid"] not in text and f'"{provisioned["name"]}"' not in text
    assert "__inputs" not in dashboard  # no import-time datasource prompt either: the variable does it
    variables = dashboard["templating"]["list"]
    assert [v["name"] for v in variables] == ["datasource", "job", "instance"]
    datasource = variables[0]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    assert not datasource.get("current")  # nothing preselected: Grafana picks its default Prometheus
    assert datasource.get("regex", "") == ""  # any name matches
    refs = list(_datasource_refs(dashboard))
    assert len(refs) > 40
    for where, ref in refs:
        if ref == {"type": "grafana", "uid": "-- Grafana --"}:  # the built-in annotations, not a datasource
            continue
        assert ref == {"type": "prometheus", "uid": "${datasource}"}, (where, ref)
    for variable in variables[1:]:
        assert variable["type"] == "query" and variable["datasource"]["uid"] == "${datasource}"
    assert variables[1]["name"] == "job" and 'job=~"$job"' in variables[2]["definition"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for expr in exprs:
        for selector in re.findall(r"\b(?:stream_cl_[a-z0-9_]+|up)\s*(\{[^}]*\})?", expr):
            assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, expr


def test_every_documented_series_has_a_panel() -> None:
    """Each `stream_cl_*` series of docs/metrics.md (learner, publisher, replica) is on the dashboard."""
    documented = set(re.findall(r"`(stream_cl_[a-z0-9_]+)`", (ROOT / "docs" / "metrics.md").read_text()))
    assert len(documented) > 30
    used: set[str] = set()
    for _, expr, _ in dashboard_queries(json.loads(DASHBOARD.read_text())):
        used |= metric_names(expr)
    histogram = {n.removesuffix("_bucket") for n in used if n.endswith("_bucket")}
    missing = documented - used - histogram
    assert not missing, f"series without a panel: {sorted(missing)}"


# -- the live stack: daemon on the broker + a real Prometheus --------------------------------------
def check_dashboard_queries(live: Live, absent_here: set[str]) -> set[str]:
    """Send every dashboard query as Grafana would: each returns real numbers, except those whose
    series are all in `absent_here`, which must return none. The names found correctly empty."""
    empty, absent = [], set()
    for where, expr, instant in dashboard_queries(json.loads(DASHBOARD.read_text())):
        result = live.query(expr) if instant else live.query_range(expr)
        values = [float(v[1]) for s in result for v in (s["values"] if "values" in s else [s["value"]])]
        has_data = any(math.isfinite(v) for v in values)
        if metric_names(expr) <= absent_here:
            assert not has_data, f"{where}: data for a series this stack cannot have: {expr}"
            absent |= metric_names(expr)
        elif not has_data:
            empty.append(f"{where}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    return absent


@dataclass
class Live:
    daemon: Daemon
    replica: Replica
    config: Config
    prometheus: str  # base URL
    produced: int
    started: float

    def query(self, expr: str) -> list[dict[str, Any]]:
        return _api(self.prometheus, "query", {"query": expr})["result"]

    def query_range(self, expr: str) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{self.started:.3f}", "end": f"{time.time():.3f}", "step": "1"}
        return _api(self.prometheus, "query_range", params)["result"]


def _api(base: str, endpoint: str, params: dict[str, str] | None = None) -> Any:
    url = f"{base}/api/v1/{endpoint}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def _die_with_parent() -> None:
    """Runs in the child: the kernel sends it SIGTERM if pytest dies, so no Prometheus outlives a killed run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)


@pytest.fixture(scope="module")
def split_mnist() -> BenchmarkStream:
    return load_stream("split-mnist", seed=0)


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return _tool("prometheus")


def _start_prometheus(
    binary: str, metrics_ports: dict[str, int], workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """deploy/prometheus/prometheus.yml with only the targets and intervals changed for a test.

    `metrics_ports`: job name (stream_cl for the learner, stream_cl_replica) -> the /metrics port.
    No Alertmanager runs here, so the `alerting:` block goes (the rules are still evaluated).
    """
    config = _load_yaml(PROMETHEUS_YML)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS_YML)]
    config.pop("alerting", None)
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    config["scrape_configs"] = [jobs[name] for name in metrics_ports]
    for name, port in metrics_ports.items():
        jobs[name].pop("dns_sd_configs", None)
        jobs[name]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("wb"),
        preexec_fn=_die_with_parent,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, workdir / "prometheus.log", "Prometheus")
    return proc, base


def wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path, what: str) -> None:
    """Until `base`/-/ready answers 200 (Prometheus, Alertmanager); `log` is shown if `proc` died."""

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(ready, 30, f"{what} to start")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate `proc`, killing it if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def live(
    broker: EmbeddedBroker,
    split_mnist: BenchmarkStream,
    prometheus_binary: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Live]:
    """The daemon learns split-mnist (finetune, 10% held out) and publishes its snapshots to a replica
    that follows them, while a real Prometheus scrapes both every second (jobs as in compose)."""
    topic = f"deploy-{os.getpid()}-{time.monotonic_ns()}"
    broker.create_topic(topic)
    snapshot_topic = f"{topic}.snapshots"
    config = load_config(
        None,
        [
            *kafka_overrides(broker.bootstrap_servers, topic),
            "serve.port=0",
            "metrics.port=0",
            "model.hidden=[64]",
            "strategy.name=finetune",
            "learner.snapshot_every_steps=5",
            "evaluation.holdout_fraction=0.1",
            "evaluation.every_samples=200",
            "evaluation.every_s=1.0",
            f"checkpoint.dir={tmp_path_factory.mktemp('ckpt')}",
            f"publish.topic={snapshot_topic}",
            "publish.interval_s=0.5",
        ],
        env={},
    )
    started = time.time()
    replica = Replica(config, snapshot_topic)  # waits for the topic the daemon creates
    replica.start()
    daemon = Daemon(config)
    daemon.start()
    assert daemon.metrics_port is not None and daemon.serve_port is not None
    assert replica.metrics_port is not None
    proc, base = _start_prometheus(
        prometheus_binary,
        {"stream_cl": daemon.metrics_port, "stream_cl_replica": replica.metrics_port},
        tmp_path_factory.mktemp("prometheus"),
    )
    try:
        # Learning must happen while Prometheus watches: wait for the daemon's group join and for
        # Prometheus's first scrape of it, then ~500 samples/s so every task spans several scrapes.
        wait_until(lambda: bool(daemon.source.assigned), 60, "the group join")

        def scraped() -> bool:
            with urllib.request.urlopen(f"{base}/api/v1/query?query=up", timeout=5) as r:
                result = json.loads(r.read())["data"]["result"]
            return sum(float(series["value"][1]) == 1.0 for series in result) == 2

        wait_until(scraped, 30, "Prometheus's first scrape of the daemon")
        produced = produce_stream(broker.bootstrap_servers, topic, split_mnist, rate=500)
        # after the stream: the first valid sample fixes the input size, so these are the odd ones out
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        producer.send(topic, b"\xc1 not msgpack")
        producer.send(topic, msgpack.packb({"x": [0.0] * 10, "y": 1}))  # wrong length
        producer.send(topic, msgpack.packb({"y": 1}))  # no x
        producer.flush()
        producer.close()
        produced += INVALID_MESSAGES
        state = Live(daemon, replica, config, base, produced, started)

        def consumed() -> float:
            return sum(
                daemon.metrics.sample_value("stream_cl_samples_total", {"outcome": o}) or 0.0
                for o in ("learned", "held_out", "invalid")
            )

        wait_until(lambda: consumed() >= produced, 60, "every produced message to be consumed")
        with PredictionClient("127.0.0.1", daemon.serve_port) as client:
            for start in range(0, 200, 40):
                client.predict_batch(split_mnist.tasks[0].test_x[start : start + 40])
        evaluations = daemon.metrics.sample_value("stream_cl_evaluations_total") or 0.0
        wait_until(
            lambda: (daemon.metrics.sample_value("stream_cl_evaluations_total") or 0.0) > evaluations + 1,
            30,
            "an evaluation of the final model",
        )
        wait_until(
            lambda: (
                replica.follower.applied > 0
                and _version(replica.registry.get()) == _version(daemon.holder.get())
            ),
            60,
            "the replica to serve the learner's final version",
        )
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        producer.send(snapshot_topic, key=b"x", value=b"\xc1 not msgpack")  # a rejected snapshot message
        producer.flush()
        producer.close()
        wait_until(
            lambda: (
                replica.metrics.sample_value(
                    "stream_cl_replica_snapshots_rejected_total", {"reason": "not_msgpack"}
                )
                == 1.0
            ),
            30,
            "the replica to reject the garbage",
        )
        wait_until(
            lambda: bool(state.query("stream_cl_average_forgetting > 0.2")),
            30,
            "Prometheus to scrape forgetting",
        )
        wait_until(
            lambda: state.query(
                f'sum(stream_cl_samples_total{{outcome=~"learned|held_out|invalid"}}) == {produced}'
            ),
            30,
            "Prometheus to scrape the final counts",
        )
        wait_until(
            lambda: state.query("stream_cl_replica_snapshots_rejected_total > 0"),
            30,
            "Prometheus to scrape the replica's reject",
        )
        time.sleep(3)  # a few more scrapes, so every 5 s rate window after the predictions has two points
        yield state
    finally:
        stop_process(proc)
        daemon.stop()
        replica.stop()


def _version(snapshot: Any) -> int | None:
    return None if snapshot is None else int(snapshot.version)


@pytest.mark.integration
def test_prometheus_scrapes_the_daemon(live: Live) -> None:
    """Prometheus reports the learner's and the replica's targets up under compose's job names."""
    for job in ("stream_cl", "stream_cl_replica"):
        (up,) = live.query(f'up{{job="{job}"}}')
        assert up["value"][1] == "1", job


@pytest.mark.integration
def test_every_dashboard_query_returns_data(live: Live) -> None:
    """Each panel target and annotation, sent as Grafana sends it, returns series with real numbers.

    Correctly empty, and checked to be: the per-key panels (this daemon holds one model) and the
    capacity panels (finetune has no capacity), whose series this stack does not have.
    """
    absent = check_dashboard_queries(live, ABSENT_HERE)
    assert absent == ABSENT_HERE  # those panels exist; per-key and eidetic runs give them data


@pytest.mark.integration
def test_dashboard_variables_list_the_jobs_and_instances(live: Live) -> None:
    """The `job` and `instance` variables' label_values() queries find the learner and the replica."""
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    found = {}
    for name in ("job", "instance"):
        query = variables[name]["query"]["query"].replace("$job", ".+")
        match = re.fullmatch(r"label_values\((\w+(?:\{[^}]*\})?), (\w+)\)", query)
        assert match, query
        selector, label = match.groups()
        found[name] = {s["metric"][label] for s in live.query(selector)}
    assert found["job"] == {"stream_cl", "stream_cl_replica"}
    ports = (live.daemon.metrics_port, live.replica.metrics_port)
    assert found["instance"] == {f"127.0.0.1:{port}" for port in ports}


@pytest.mark.integration
def test_accuracy_matrix_panel_gets_the_whole_lower_triangle(live: Live) -> None:
    """The heatmap's instant query returns R[i][j] for every j <= i of the five tasks."""
    cells = {
        (s["metric"]["after_task"], s["metric"]["task"])
        for s in live.query('stream_cl_accuracy_matrix{job="stream_cl"}')
    }
    assert {(str(i), str(j)) for i in range(5) for j in range(i + 1)} <= cells


@pytest.mark.integration
def test_every_alert_expression_evaluates_on_live_series(live: Live) -> None:
    """Each rule is healthy in Prometheus and, compared with `bool`, returns data (its `and`s can match)."""
    rules = {r["name"]: r for g in _api(live.prometheus, "rules")["groups"] for r in g["rules"]}
    silent = []
    for rule in alert_rules():
        loaded = rules[rule["alert"]]
        assert loaded["health"] == "ok", (rule["alert"], loaded.get("lastError"))
        if metric_names(rule["expr"]) <= ABSENT_HERE:  # StreamClCapacityExhausted under finetune
            assert not live.query(always_answering(rule["expr"])), rule["alert"]
            continue
        if not live.query(always_answering(rule["expr"])):
            silent.append(f"{rule['alert']}: {always_answering(rule['expr'])}")
    assert not silent, "alert expressions that can never fire on this daemon:\n" + "\n".join(silent)


@pytest.mark.integration
def test_forced_forgetting_makes_the_forgetting_alert_true(live: Live) -> None:
    """Fine-tuning on class-incremental split-mnist: the forgetting alerts' expressions hold and they go pending."""
    expressions = {r["alert"]: r["expr"] for r in alert_rules()}
    for alert in ("StreamClForgetting", "StreamClTaskForgotten"):
        assert live.query(expressions[alert]), alert

    def pending() -> set[str]:
        return {a["labels"]["alertname"] for a in _api(live.prometheus, "alerts")["alerts"]}

    wait_until(
        lambda: {"StreamClForgetting", "StreamClTaskForgotten"} <= pending(), 15, "the forgetting alerts"
    )
    # nothing else is wrong with this stack: the replica keeps up, publishing and Kafka work
    assert pending() == {"StreamClForgetting", "StreamClTaskForgotten"}


@pytest.mark.integration
def test_forgetting_gauges_rise_through_the_run(live: Live) -> None:
    """Average forgetting rises through the run and ends high; task 0, learned first, ends mostly forgotten.

    (The first scrape may already fall after the first boundary, so the starting value is not pinned.)
    """
    (series,) = live.query_range('stream_cl_average_forgetting{job="stream_cl"}')
    values = [float(v) for _, v in series["values"]]
    assert values[0] < values[-1] and values[-1] > 0.5, values
    (task0,) = live.query('stream_cl_task_forgetting{job="stream_cl", task="0"}')
    assert float(task0["value"][1]) > 0.5


@pytest.mark.integration
def test_held_out_samples_are_counted_apart(live: Live) -> None:
    """Held-out samples are counted as such, never as learned: learned + held_out + invalid = produced."""
    counts = {
        s["metric"]["outcome"]: float(s["value"][1])
        for s in live.query('stream_cl_samples_total{job="stream_cl"}')
    }
    assert counts["held_out"] > 0
    assert counts["invalid"] == INVALID_MESSAGES
    assert counts["learned"] + counts["held_out"] + counts["invalid"] == live.produced
    assert counts["held_out"] < 0.2 * live.produced  # about evaluation.holdout_fraction, not more


@pytest.mark.integration
def test_dashboard_and_alerts_name_only_exported_metrics(live: Live) -> None:
    """Every metric name in the dashboard and alerts.yml is one the learner or replica exports (or `up`)."""
    exported = set(ABSENT_HERE)  # exported by per-key daemons and by eidetic only
    for port in (live.daemon.metrics_port, live.replica.metrics_port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            exported |= exported_names(r.read().decode())
    used: set[str] = set()
    for _, expr, _ in dashboard_queries(json.loads(DASHBOARD.read_text())):
        used |= metric_names(expr)
    for rule in alert_rules():
        used |= metric_names(rule["expr"])
    assert len(used) > 15
    assert not used - exported - PROMETHEUS_SERIES, sorted(used - exported - PROMETHEUS_SERIES)


@pytest.mark.integration
def test_container_health_commands_pass_on_the_live_daemon(live: Live, tmp_path: Path) -> None:
    """The Dockerfile HEALTHCHECK and the Kubernetes readiness probe, run as written, succeed on a ready daemon."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"HEALTHCHECK .*?CMD (\[.*\])", text)
    assert match, "no HEALTHCHECK"
    healthcheck = json.loads(match.group(1))
    readiness = _k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert live.daemon.http_port is not None  # the probe's GET, as the kubelet makes it (no token)
    probe_url = f"http://127.0.0.1:{live.daemon.http_port}{readiness['httpGet']['path']}"
    with urllib.request.urlopen(probe_url, timeout=10) as r:
        assert r.status == 200
    config_toml = tmp_path / "config.toml"
    config_toml.write_text("")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "STREAM_CL_SERVE__PORT": str(live.daemon.serve_port),
    }
    for command in (shlex.join(healthcheck),):
        command = command.replace("/etc/stream_cl/config.toml", str(config_toml))
        result = subprocess.run(
            ["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (command, result.stdout, result.stderr)


@pytest.mark.integration
def test_report_from_the_running_daemon_and_its_checkpoint(live: Live, tmp_path: Path) -> None:
    """`stream-cl report` writes PNGs and Markdown from the live /metrics and from the newest checkpoint."""
    url = f"http://127.0.0.1:{live.daemon.metrics_port}/metrics"
    assert main(["report", "--metrics-url", url, "--out", str(tmp_path / "live")]) == 0
    markdown = (tmp_path / "live" / "report.md").read_text()
    assert "| after task \\ task | 0 | 1 | 2 | 3 | 4 |" in markdown
    assert (tmp_path / "live" / "accuracy_matrix.png").stat().st_size > 10_000
    ckpt = checkpoint_dir(live.config)
    assert main(["report", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ckpt")]) == 0
    markdown = (tmp_path / "ckpt" / "report.md").read_text()
    assert "## Task boundaries" in markdown
    assert (tmp_path / "ckpt" / "accuracy_over_time.png").stat().st_size > 10_000
