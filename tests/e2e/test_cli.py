"""The installed ``driftserve`` command as a user runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import wait_for

EXE = str(Path(sys.executable).with_name("driftserve"))
PORTS = {
    "--http-port": "18280",
    "--kafka-bootstrap": "127.0.0.1:19392",
    "--redis-url": "redis://127.0.0.1:16679/0",
}


def _args(state: Path) -> list[str]:
    return [EXE, "up", "--state-dir", str(state), *[x for kv in PORTS.items() for x in kv]]


def test_up_serves_and_stops_cleanly_on_sigterm(tmp_path):
    proc = subprocess.Popen(_args(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "driftserve ready at" in line:
                break
        assert any("driftserve ready at http://127.0.0.1:18280" in ln for ln in lines), "".join(lines[-30:])
        r = httpx.get("http://127.0.0.1:18280/healthz", timeout=10)
        assert r.status_code == 200
        children = psutil.Process(proc.pid).children(recursive=True)
        names = {c.name() for c in children}
        assert any("tansu" in n for n in names) and any("redis" in n for n in names)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]
        assert "stopped." in out
        wait_for(
            lambda: not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE],
            30,
            what="every child process to exit",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_refuses_a_taken_port_with_a_clear_message(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # a port this test owns, whatever the previous test left in TIME_WAIT
        held.listen()
        port = held.getsockname()[1]
        args = [*_args(tmp_path), "--http-port", str(port)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in result.stderr and "--http-port" in result.stderr
