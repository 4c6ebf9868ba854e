"""The README's setup on a fresh machine: scripts/system-deps.sh and scripts/setup.sh run against stub
system tools (apt-get, apt-cache, sudo, id), as root without sudo (a container, a CI runner) and as a
user with sudo, with and without espeak-ng present.

The stubs record how they were called; `sudo` clears the environment as the real one does
(env_reset), so DEBIAN_FRONTEND only reaches apt-get when the script passes it explicitly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# real tools the scripts may use; everything else on PATH is a stub
TOOLS = ["bash", "env", "sed", "cat", "grep", "head", "cut", "sha256sum", "mktemp", "rm", "tar", "nproc",
         "dirname", "mkdir", "chmod", "printf", "sleep"]  # fmt: skip

STUBS = {
    "id": 'if [ "$1" = -u ]; then echo "$FAKE_UID"; else /usr/bin/id "$@"; fi\n',
    "sudo": (
        'echo "sudo $*" >> "$LOG"\n'
        # env_reset: only PATH and the stubs' own settings survive
        'exec env -i PATH="$PATH" LOG="$LOG" BIN="$BIN" FAKE_UID=0 ESPEAK_CANDIDATE="$ESPEAK_CANDIDATE" '
        'APT_HAS_PY311="$APT_HAS_PY311" "$@"\n'
    ),
    "apt-get": (
        'echo "apt-get uid=$(id -u) DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-} $*" >> "$LOG"\n'
        'if [ "$(id -u)" -ne 0 ]; then echo "E: permission denied" >&2; exit 100; fi\n'
        'if [ "$1" = install ]; then\n'
        '  for pkg in "$@"; do\n'
        '    case "$pkg" in\n'
        '      espeak-ng) printf \'#!/bin/sh\\necho "eSpeak NG text-to-speech: 1.51  Data at: /x"\\n\' > "$BIN/espeak-ng";'
        ' chmod +x "$BIN/espeak-ng" ;;\n'
        '      python3.11) printf \'#!/bin/sh\\nexec %s "$@"\\n\' "$REAL_PYTHON" > "$BIN/python3.11";'
        ' chmod +x "$BIN/python3.11" ;;\n'
        "    esac\n"
        "  done\n"
        "fi\n"
    ),
    "apt-cache": (
        'if [ "$1" = policy ]; then echo "  Installed: (none)"; echo "  Candidate: $ESPEAK_CANDIDATE"; exit 0; fi\n'
        'if [ "$1" = show ] && [ "$2" = python3.11 ]; then [ "$APT_HAS_PY311" = 1 ]; exit; fi\n'
        "exit 100\n"
    ),
    "curl": 'echo "curl $*" >> "$LOG"; exit 22\n',
}


def machine(tmp_path: Path, *, uid: int, sudo: bool, espeak: bool, python: bool = True,
            candidate: str = "1.51+dfsg-10+deb12u2", apt_has_py311: bool = True) -> tuple[dict, Path]:  # fmt: skip
    """A PATH of stubs describing a machine; returns (environment, log file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        real = shutil.which(tool)
        if real:
            (bin_dir / tool).symlink_to(real)
    for name, body in STUBS.items():
        if name == "sudo" and not sudo:
            continue
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    if espeak:
        (bin_dir / "espeak-ng").write_text('#!/bin/sh\necho "eSpeak NG text-to-speech: 1.51  Data at: /x"\n')
        (bin_dir / "espeak-ng").chmod(0o755)
    if python:
        (bin_dir / "python3.11").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        (bin_dir / "python3.11").chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PATH": str(bin_dir), "LOG": str(log), "BIN": str(bin_dir), "FAKE_UID": str(uid),
           "ESPEAK_CANDIDATE": candidate, "APT_HAS_PY311": "1" if apt_has_py311 else "0",
           "REAL_PYTHON": sys.executable, "HOME": str(tmp_path)}  # fmt: skip
    return env, log


def run(script: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / script)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kw)  # fmt: skip


def test_root_without_sudo_installs_espeak(tmp_path):
    """A fresh container: root, no sudo command, no espeak-ng (the case that used to exit 127)."""
    env, log = machine(tmp_path, uid=0, sudo=False, espeak=False)
    out = run("system-deps.sh", env)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        "apt-get uid=0 DEBIAN_FRONTEND=noninteractive update -qq",
        "apt-get uid=0 DEBIAN_FRONTEND=noninteractive install -y -qq --no-install-recommends espeak-ng",
    ]
    assert "command not found" not in out.stderr


def test_user_with_sudo_installs_through_sudo(tmp_path):
    env, log = machine(tmp_path, uid=1000, sudo=True, espeak=False)
    out = run("system-deps.sh", env)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("sudo env DEBIAN_FRONTEND=noninteractive apt-get update")
    assert calls[1] == "apt-get uid=0 DEBIAN_FRONTEND=noninteractive update -qq"
    assert calls[3] == (
        "apt-get uid=0 DEBIAN_FRONTEND=noninteractive install -y -qq --no-install-recommends espeak-ng"
    )


@pytest.mark.parametrize("uid, sudo", [(0, False), (1000, True), (1000, False)])
def test_nothing_to_do_when_everything_is_there(tmp_path, uid, sudo):
    env, log = machine(tmp_path, uid=uid, sudo=sudo, espeak=True)
    out = run("system-deps.sh", env)
    assert out.returncode == 0, out.stderr
    assert log.read_text() == ""


def test_user_without_sudo_gets_a_clear_error(tmp_path):
    env, log = machine(tmp_path, uid=1000, sudo=False, espeak=False)
    out = run("system-deps.sh", env)
    assert out.returncode != 0
    assert "needs root: run this as root, or install sudo" in out.stderr
    assert log.read_text() == ""


def test_python311_installed_from_apt_when_missing(tmp_path):
    env, log = machine(tmp_path, uid=0, sudo=False, espeak=True, python=False)
    out = run("system-deps.sh", env)
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines()[-1].endswith("--no-install-recommends python3.11 python3.11-venv")


def test_no_python311_in_apt_leaves_it_to_uv(tmp_path):
    """Ubuntu 24.04: python3.11 is not in the archive; setup.sh fetches it with uv."""
    env, log = machine(tmp_path, uid=0, sudo=False, espeak=False, python=False, apt_has_py311=False)
    out = run("system-deps.sh", env)
    assert out.returncode == 0, out.stderr
    assert "fetch Python 3.11 with uv" in out.stdout
    assert log.read_text().splitlines()[-1].endswith("--no-install-recommends espeak-ng python3-venv")


def test_another_espeak_version_in_apt_is_built_from_debian_source(tmp_path):
    """Ubuntu 22.04 offers 1.50: the script installs build tools and fetches Debian's pinned 1.51 source
    (the stub curl fails, so the build stops there with an error)."""
    env, log = machine(tmp_path, uid=0, sudo=False, espeak=False, candidate="1.50+dfsg-10")
    out = run("system-deps.sh", env)
    assert out.returncode != 0
    calls = log.read_text().splitlines()
    install = calls[1].split()
    assert "espeak-ng" not in install and {"gcc", "make", "autoconf", "automake", "libtool"} <= set(install)
    assert (
        calls[2].startswith("curl")
        and "deb.debian.org" in calls[2]
        and "espeak-ng_1.51+dfsg.orig" in calls[2]
    )
    assert calls[3].startswith("curl") and "archive.ubuntu.com" in calls[3]  # the same file, the other pool
    assert "building 1.51 from Debian's source" in out.stdout


def test_setup_sh_on_a_fresh_root_machine(tmp_path):
    """The whole of scripts/setup.sh as root with no sudo and no espeak-ng, reusing this test run's
    virtual environment (its install stamp matches, so pip has nothing to do)."""
    venv = Path(sys.prefix)
    stamp = venv / ".musicgen-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    if not stamp.is_file() or not stamp.read_text().startswith(digest + "-"):
        pytest.skip("the test run's environment is not scripts/setup.sh's for this pyproject.toml")
    extras = stamp.read_text().strip().split("-", 1)[1]
    env, log = machine(tmp_path, uid=0, sudo=False, espeak=False)
    env.update(VENV=str(venv), EXTRAS=extras)
    before = stamp.stat().st_mtime
    out = run("setup.sh", env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "DEBIAN_FRONTEND=noninteractive install -y -qq --no-install-recommends espeak-ng" in log.read_text()
    )
    assert "command not found" not in out.stderr and "warning" not in out.stderr
    assert stamp.stat().st_mtime == before
    assert os.access(tmp_path / "bin" / "espeak-ng", os.X_OK)
