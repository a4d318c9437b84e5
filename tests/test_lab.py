"""`make lab` starts JupyterLab for anyone, root included (Jupyter refuses root without --allow-root, and most
containers run as root): the test runs the Makefile's own recipe, finds the server answering on 127.0.0.1 and
stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import REPO, subprocess_env

TOKEN = "dpolab-test-token"


def _make_lab(venv: Path, port: int, *flags: str) -> list[str]:
    """`make lab` with this test's environment as the venv; -o: its install stamp counts as up to date."""
    args = f"--no-browser --ip=127.0.0.1 --port={port} --ServerApp.port_retries=0 --IdentityProvider.token={TOKEN}"
    return ["make", "--no-print-directory", *flags, "-o", f"{venv}/.installed", "lab", f"VENV={venv}", f"ARGS={args}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_serves_jupyterlab_on_localhost(tmp_path):
    venv, port = Path(sys.prefix), _free_port()
    dry_run = subprocess.run(_make_lab(venv, port, "-n"), cwd=REPO, capture_output=True, text=True, check=True)
    assert ("--allow-root" in dry_run.stdout) == (os.geteuid() == 0)  # the flag only for root
    env = {
        **subprocess_env(),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),  # the server's files stay in the test's folder
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    log = tmp_path / "lab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _make_lab(venv, port), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        status, deadline = None, time.monotonic() + 120
        while status is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{port}/api/status?token={TOKEN}"
                with urllib.request.urlopen(url, timeout=2) as response:
                    status = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert status is not None, f"no answer on 127.0.0.1:{port} (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        assert "started" in status and status["kernels"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={TOKEN}", timeout=10) as response:
            assert response.status == 200 and b"JupyterLab" in response.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make and the server it started: the group this test created
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
