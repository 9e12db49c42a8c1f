"""deploy/ for scale-out: the prediction-replica role and the multi-daemon learners, compose and Kubernetes.

Static checks (tests/test_deploy.py covers the single daemon, Prometheus and Grafana): both sides of
every link agree. The replicas follow the topic the learners publish to, both read the same
`models.per_key`, the load balancer and Services point at the replicas' real port, every config is
a valid stream_cl config, and every command line parses with the real CLI parser.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from stream_cl.cli import build_parser
from stream_cl.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
LEARNERS = DEPLOY / "k8s" / "learners.yaml"
REPLICAS = DEPLOY / "k8s" / "replicas.yaml"


def _services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def _env_config(service: dict[str, Any]) -> Config:
    env = {k: str(v) for k, v in service["environment"].items()}
    assert env["STREAM_CL_SERVE__TOKEN"].startswith("${STREAM_CL_TOKEN:?")  # required, never a default
    env["STREAM_CL_SERVE__TOKEN"] = "secret"
    return load_config(None, [], env=env)


def _cli(argv: list[str]) -> Any:
    return build_parser().parse_args(argv)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_compose_replicas_follow_the_topic_the_learners_publish() -> None:
    """Learners publish to a compacted topic kafka-init creates; replicas `serve --follow` it with the same per_key."""
    services = _services()
    learner = _env_config(services["stream-cl"])
    replica_service = services["stream-cl-replica"]
    replica = _env_config(replica_service)
    args = _cli(replica_service["command"])
    assert args.command == "serve" and args.follow == learner.publish.topic != ""
    assert learner.models.per_key and replica.models.per_key  # scaled learners need one model per key
    assert (replica.serve.host, replica.metrics.host) == ("0.0.0.0", "0.0.0.0")
    assert replica_service["image"] == services["stream-cl"]["image"]
    assert replica_service["deploy"]["replicas"] >= 2
    init = " ".join(services["kafka-init"]["command"]).replace("\\\n", " ")  # one line per command
    created = re.findall(r"--topic (\S+) --partitions (\d+)([^\n]*)", init)
    topics = {name: (int(partitions), rest) for name, partitions, rest in created}
    assert learner.kafka.topic in topics and learner.kafka.dead_letter_topic in topics
    assert topics[learner.kafka.topic][0] >= 2, "one partition cannot be split between learners"
    assert "cleanup.policy=compact" in topics[learner.publish.topic][1]


def test_compose_learners_can_scale() -> None:
    """No fixed host port on the learners (scaled containers would collide); they share one checkpoint volume."""
    services = _services()
    learner = services["stream-cl"]
    assert "ports" not in learner and "ports" not in services["stream-cl-replica"]
    config = _env_config(learner)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in learner["volumes"]}
    assert mounts[config.checkpoint.dir] in yaml.safe_load(COMPOSE.read_text())["volumes"]


def test_compose_load_balancer_fronts_the_replicas() -> None:
    """The HAProxy config the lb mounts balances TCP over the replica service's socket port, on the published port."""
    services = _services()
    lb = services["lb"]
    (mount,) = lb["volumes"]
    source, target = mount.split(":")[:2]
    assert (DEPLOY / source).resolve() == HAPROXY and target == "/usr/local/etc/haproxy/haproxy.cfg"
    replica = _env_config(services["stream-cl-replica"])
    cfg = HAPROXY.read_text()
    assert re.search(r"^\s*mode tcp", cfg, re.M) and re.search(r"^\s*mode http", cfg, re.M)
    binds = re.findall(r"^\s*bind :(\d+)", cfg, re.M)
    published = [p.split(" ")[0].strip('"') for p in lb["ports"]]
    assert published == [f"127.0.0.1:{b}:{b}" for b in binds]  # the host's loopback only
    servers = re.findall(r"^\s*server-template \S+ \d+ (\S+) .*resolvers docker", cfg, re.M)
    assert servers == [
        f"stream-cl-replica:{replica.serve.port}",
        f"stream-cl-replica:{replica.serve.http_port}",
    ]
    assert [int(b) for b in binds] == [replica.serve.port, replica.serve.http_port]
    assert "option httpchk GET /v2/health/ready" in cfg  # HTTP traffic only to ready replicas
    assert "stream-cl-replica" in lb["depends_on"]


def test_prometheus_scrapes_learners_and_replicas() -> None:
    """One job per role, discovering every scaled container of its compose service on the metrics port."""
    services = _services()
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    for job, service in (("stream_cl", "stream-cl"), ("stream_cl_replica", "stream-cl-replica")):
        (discovery,) = jobs[job]["dns_sd_configs"]
        port = _env_config(services[service]).metrics.port
        assert (discovery["names"], discovery["type"], discovery["port"]) == ([service], "A", port)
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    assert not [r["alert"] for r in rules if "job=" in r["expr"]]  # no rule depends on these job names


LIVE, READY = "/v2/health/live", "/v2/health/ready"  # the OIP v2 health routes the probes GET


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _k8s_config(tmp_path: Path) -> tuple[Config, dict[str, Any]]:
    config_map = _one(_docs(LEARNERS), "ConfigMap")
    (tmp_path / "config.toml").write_text(config_map["data"]["config.toml"])
    return load_config(tmp_path / "config.toml", [], env={}), config_map


def test_kubernetes_learners_are_many_daemons_on_a_shared_store(tmp_path: Path) -> None:
    """Several learners, per-key models, a ReadWriteMany store at checkpoint.dir, publishing snapshots."""
    config, config_map = _k8s_config(tmp_path)
    docs = _docs(LEARNERS)
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "Deployment"}
    assert config.models.per_key and config.publish.topic
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    assert _cli(container["args"]).command == "run"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "predict": config.serve.port,
        "http": config.serve.http_port,
        "metrics": config.metrics.port,
    }
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics.port)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["checkpoints"] == config.checkpoint.dir
    assert Path(container["args"][-1]).parent.as_posix() == mounts["config"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    claim = _one(docs, "PersistentVolumeClaim")
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "stream-cl", "key": "token"}


def test_kubernetes_replicas_follow_the_learners_behind_a_service(tmp_path: Path) -> None:
    """Replicas use the learners' config, follow their topic, get ready on `health`, and a Service balances them."""
    config, config_map = _k8s_config(tmp_path)
    docs = _docs(REPLICAS)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PodDisruptionBudget"}
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    args = _cli(container["args"])
    assert args.command == "serve" and args.follow == config.publish.topic
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert "checkpoints" not in volumes  # replicas never learn
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "predict": config.serve.port,
        "http": config.serve.http_port,
        "metrics": config.metrics.port,
    }
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics.port)
    for probe, path in (("startupProbe", LIVE), ("livenessProbe", LIVE), ("readinessProbe", READY)):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    service = _one(docs, "Service")
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "replica"  # the learners' pods do not match
    learner_labels = _one(_docs(LEARNERS), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= learner_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    budget = _one(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
