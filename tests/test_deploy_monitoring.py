"""deploy/: where alerts go (Alertmanager in compose) and the Prometheus Operator manifests.

Alertmanager: `amtool check-config` accepts the example config, every route names a receiver that
exists, Prometheus's `alerting:` block and the webhook URLs point at the compose services that listen
there, and a real Alertmanager (Debian's prometheus-alertmanager, installed by .ci/run like
prometheus; a missing binary fails these tests) delivers a critical and a warning alert to the
example receiver (deploy/alertmanager/webhook_log.py) on their own routes.

Operator: deploy/k8s/monitoring.yaml's PodMonitors select the learner and replica pods of
learners.yaml and replicas.yaml on their metrics port, and its PrometheusRule holds exactly the
groups of deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import free_port, wait_until
from test_deploy import _die_with_parent, stop_process, wait_ready

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
WEBHOOK_LOG = DEPLOY / "alertmanager" / "webhook_log.py"
MONITORING = DEPLOY / "k8s" / "monitoring.yaml"
LEARNERS = DEPLOY / "k8s" / "learners.yaml"
REPLICAS = DEPLOY / "k8s" / "replicas.yaml"


def _tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(
        f"{' or '.join(names)} not found: .ci/run installs Debian's prometheus-alertmanager package"
    )


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# -- Alertmanager -----------------------------------------------------------------------------------
def test_amtool_check_config_passes() -> None:
    """`amtool check-config` accepts deploy/alertmanager/alertmanager.yml."""
    result = subprocess.run(
        [_tool("amtool"), "check-config", str(ALERTMANAGER_YML)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _routes(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield route
    for child in route.get("routes", []):
        yield from _routes(child)


def test_alertmanager_routes_reach_the_example_receiver_in_compose() -> None:
    """Routes name existing receivers; critical alerts have their own; the webhooks hit alert-log's port."""
    config = _load(ALERTMANAGER_YML)
    receivers = {r["name"]: r for r in config["receivers"]}
    routes = list(_routes(config["route"]))
    assert {r["receiver"] for r in routes} == set(receivers)  # every receiver used, none missing
    (critical,) = [r for r in routes[1:] if 'severity = "critical"' in r.get("matchers", [])]
    assert critical["receiver"] != config["route"]["receiver"]
    services = _load(COMPOSE)["services"]
    log_command = services["alert-log"]["command"]
    assert Path(log_command[1]).name == WEBHOOK_LOG.name
    mounts = {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in services["alert-log"]["volumes"]}
    assert mounts[log_command[1]] == WEBHOOK_LOG
    for receiver in receivers.values():
        for hook in receiver["webhook_configs"]:
            assert hook["url"].startswith(f"http://alert-log:{log_command[2]}/"), hook["url"]
    alertmanager = services["alertmanager"]
    assert alertmanager["image"].startswith("prom/alertmanager:")
    config_flag = next(a for a in alertmanager["command"] if a.startswith("--config.file="))
    (mount,) = [v for v in alertmanager["volumes"] if v.startswith("./alertmanager/alertmanager.yml:")]
    assert mount.split(":")[1] == config_flag.split("=", 1)[1]
    assert "alertmanager" in services["prometheus"]["depends_on"]
    assert "alertmanager-data" in _load(COMPOSE)["volumes"]


def test_prometheus_sends_alerts_to_the_compose_alertmanager() -> None:
    """prometheus.yml's `alerting:` block targets the alertmanager service on the port it listens on."""
    (manager,) = _load(PROMETHEUS_YML)["alerting"]["alertmanagers"]
    (static,) = manager["static_configs"]
    assert static["targets"] == ["alertmanager:9093"]  # Alertmanager's default --web.listen-address
    published = _load(COMPOSE)["services"]["alertmanager"]["ports"]
    assert published == ["127.0.0.1:9093:9093"]


@pytest.mark.integration
def test_a_real_alertmanager_delivers_alerts_to_the_example_receiver(tmp_path: Path) -> None:
    """Alertmanager with the shipped routes (only hosts, ports and waits changed) notifies webhook_log.py.

    A critical alert takes the critical route, a warning the default one, and a warning of a process
    that is down is inhibited (never delivered).
    """
    binary = _tool("prometheus-alertmanager", "alertmanager")
    hook_port, api_port = free_port(), free_port()
    config = _load(ALERTMANAGER_YML)
    config["route"].update(group_wait="1s", group_interval="1s")
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = hook["url"].replace("alert-log:9099", f"127.0.0.1:{hook_port}")
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "webhook.log").open("w")
    hook = subprocess.Popen(
        [sys.executable, str(WEBHOOK_LOG), str(hook_port)], stdout=log, preexec_fn=_die_with_parent
    )
    manager = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{api_port}",
            "--cluster.listen-address=",  # no gossip: a single instance notifies at once
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "alertmanager.err").open("wb"),
        preexec_fn=_die_with_parent,
    )
    base = f"http://127.0.0.1:{api_port}"
    try:
        wait_ready(manager, base, tmp_path / "alertmanager.err", "Alertmanager")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        alerts = [
            {
                "labels": {"alertname": name, "severity": severity, "job": "stream_cl", "instance": instance},
                "annotations": {"summary": f"{name} test"},
                "startsAt": now,
            }
            for name, severity, instance in (
                ("StreamClDown", "critical", "a"),
                ("StreamClForgetting", "warning", "b"),
                ("StreamClCheckpointTooOld", "warning", "a"),  # a is down: inhibited
            )
        ]
        request = urllib.request.Request(
            f"{base}/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200

        def delivered() -> dict[str, dict[str, Any]]:
            lines = [json.loads(line) for line in (tmp_path / "webhook.log").read_text().splitlines()]
            return {line["labels"]["alertname"]: line for line in lines}

        wait_until(
            lambda: {"StreamClDown", "StreamClForgetting"} <= set(delivered()), 30, "the notifications"
        )
        time.sleep(3)  # three more group intervals: time enough for the inhibited one to show up
        got = delivered()
        assert set(got) == {"StreamClDown", "StreamClForgetting"}
        assert (got["StreamClDown"]["route"], got["StreamClDown"]["receiver"]) == (
            "critical",
            "stream-cl-critical",
        )
        assert (got["StreamClForgetting"]["route"], got["StreamClForgetting"]["status"]) == (
            "warning",
            "firing",
        )
    finally:
        for proc in (manager, hook):
            stop_process(proc)
        log.close()


# -- Prometheus Operator ----------------------------------------------------------------------------
K8S_SINGLE = DEPLOY / "k8s" / "stream-cl.yaml"
# The fields these manifests may use (monitoring.coreos.com/v1): a misspelt one is dropped silently
# by a lenient API server, so it is caught here.
PODMONITOR_SPEC = {"selector", "podMetricsEndpoints", "jobLabel", "namespaceSelector", "podTargetLabels"}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings"}


def _pod_template(path: Path) -> dict[str, Any]:
    (deployment,) = [d for d in _docs(path) if d["kind"] == "Deployment"]
    return dict(deployment["spec"]["template"])


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_operator_manifests_are_pod_monitors_and_a_prometheus_rule() -> None:
    """Two PodMonitors and one PrometheusRule of monitoring.coreos.com/v1, using only known fields."""
    docs = _docs(MONITORING)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("PodMonitor", "stream-cl-learners"),
        ("PodMonitor", "stream-cl-replicas"),
        ("PrometheusRule", "stream-cl"),
    ]
    for doc in docs:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        if doc["kind"] == "PodMonitor":
            assert set(doc["spec"]) <= PODMONITOR_SPEC
            for endpoint in doc["spec"]["podMetricsEndpoints"]:
                assert set(endpoint) <= ENDPOINT_FIELDS
        else:
            assert set(doc["spec"]) == {"groups"}


def test_pod_monitors_scrape_the_learners_and_the_replicas_where_the_annotations_say() -> None:
    """Each PodMonitor selects its role's pods (not the other's) on the port and path of their annotations."""
    monitors = {d["metadata"]["name"]: d["spec"] for d in _docs(MONITORING) if d["kind"] == "PodMonitor"}
    pods = {"learners": _pod_template(LEARNERS), "single": _pod_template(K8S_SINGLE)}
    pods["replicas"] = _pod_template(REPLICAS)
    expected = {"stream-cl-learners": {"learners", "single"}, "stream-cl-replicas": {"replicas"}}
    for name, spec in monitors.items():
        selected = {
            role for role, pod in pods.items() if _selects(spec["selector"], pod["metadata"]["labels"])
        }
        assert selected == expected[name], name
        (endpoint,) = spec["podMetricsEndpoints"]
        for role in selected:
            pod = pods[role]
            annotations = pod["metadata"]["annotations"]
            (container,) = pod["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert str(ports[endpoint["port"]]) == annotations["prometheus.io/port"], (name, role)
            assert endpoint["path"] == annotations["prometheus.io/path"], (name, role)
        assert endpoint["interval"] == _load(PROMETHEUS_YML)["global"]["scrape_interval"]


def test_prometheus_rule_embeds_exactly_the_alerts_of_alerts_yml() -> None:
    """The PrometheusRule's groups are alerts.yml's groups, rule for rule (edit both together)."""
    (rule,) = [d for d in _docs(MONITORING) if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == _load(ALERTS_YML)["groups"]


def test_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    """`promtool check rules` on the PrometheusRule's spec, as the Operator hands it to Prometheus."""
    (rule,) = [d for d in _docs(MONITORING) if d["kind"] == "PrometheusRule"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
