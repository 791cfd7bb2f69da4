"""The README's main command (`make lab`) starts JupyterLab on notebooks/ and serves /lab."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_serves_lab(tmp_path):
    port = free_port()
    token = "labkit-test-token"
    env = dict(os.environ, JUPYTER_TOKEN=token, JUPYTER_RUNTIME_DIR=str(tmp_path), BROWSER="true")
    proc = subprocess.Popen(
        ["make", "-s", "lab", f"PORT={port}", "LAB_FLAGS=--no-browser"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        status, body = None, ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=5) as r:
                    status, body = r.status, r.read().decode()
                    break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"make lab exited early:\n{proc.stdout.read().decode()}")
                time.sleep(0.5)
        assert status == 200, "JupyterLab did not answer on /lab within 90 s"
        assert "JupyterLab" in body
        # the notebooks folder is the root, and the local profile is the default
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}", timeout=10) as r:
            names = r.read().decode()
        assert "00_welcome.ipynb" in names
        # without the token the API is refused
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=10)
            refused = False
        except urllib.error.HTTPError as e:
            refused = e.code == 403
        assert refused
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
