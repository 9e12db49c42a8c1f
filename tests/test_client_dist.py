"""The torch-free `stream-cl-client` distribution (client/): what it ships, that it needs neither
torch nor stream_cl, and the socket client's reconnect on a dropped connection."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from test_serve import make_snapshot, samples

from stream_cl.config import ServeConfig
from stream_cl.serve.server import PredictionServer
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl_client import PredictionClient

ROOT = Path(__file__).resolve().parents[1]


def _server(**overrides: object) -> PredictionServer:
    holder = SnapshotHolder()
    holder.publish(make_snapshot())
    return PredictionServer(ServeConfig(port=0, http_port=0, **overrides), holder)  # type: ignore[arg-type]


def test_the_wheel_holds_the_client_alone_and_depends_on_numpy_and_msgpack(tmp_path: Path) -> None:
    source = tmp_path / "client"  # a copy: building in place would leave build/ and egg-info in client/
    shutil.copytree(
        ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("stream_cl_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {n.split("/")[0] for n in names if not n.endswith((".dist-info/", ".dist-info"))} <= {
        "stream_cl_client",
        *{n.split("/")[0] for n in names if ".dist-info/" in n},
    }
    assert "stream_cl_client/socket_client.py" in names and "stream_cl_client/http_client.py" in names
    requires = sorted(line.split()[1] for line in metadata.splitlines() if line.startswith("Requires-Dist:"))
    assert [r.split(">")[0].split("<")[0] for r in requires] == ["msgpack", "numpy"]


def test_the_client_runs_without_torch_or_stream_cl() -> None:
    """Imported with torch and stream_cl made unimportable, both clients predict against a server."""
    with _server() as server:
        code = (
            "import sys; sys.modules['torch'] = None; sys.modules['stream_cl'] = None\n"
            "from stream_cl_client import PredictionClient, HttpPredictionClient\n"
            f"with PredictionClient('127.0.0.1', {server.port}) as c: assert c.predict([0.0] * 6, task='b')['ok']\n"
            f"with HttpPredictionClient('127.0.0.1', {server.http_port}) as c:\n"
            "    assert c.predict([0.0] * 6, task='b')['label'] in (0, 1, 'two')\n"
            "assert 'torch' not in {m for m, v in sys.modules.items() if v is not None}\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT / "client")


def test_socket_client_reconnects_and_authenticates_again() -> None:
    """The server drops an idle connection; the next call opens a new one, re-auths, and answers."""
    with (
        _server(idle_timeout_s=0.3, token="s3cret") as server,
        PredictionClient("127.0.0.1", server.port or 0, token="s3cret") as client,
    ):
        assert client.predict(samples(1)[0])["ok"]
        time.sleep(1.0)  # past serve.idle_timeout_s: the server closes the connection
        assert client.predict_batch(samples(3), key=None)["ok"]
        assert client.reconnects == 1


def test_reconnect_can_be_turned_off() -> None:
    with (
        _server(idle_timeout_s=0.3) as server,
        PredictionClient("127.0.0.1", server.port or 0, reconnect=False) as client,
    ):
        assert client.health()["ok"]
        time.sleep(1.0)
        with pytest.raises(ConnectionError):
            client.health()
