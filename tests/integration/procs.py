"""Helpers that run driftserve processes (and a persistent broker) for fault-injection tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ops.settings import Settings
from ops.stack import die_with_parent, settings_env, tansu_binary
from tests.conftest import wait_for


class WriterProcess:
    """``driftserve memory-writer`` as its own OS process, so it can be killed with SIGKILL."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready_file = settings.state_dir.resolve() / "run" / "memory-writer.ready"
        self.log_path = settings.state_dir.resolve() / "memory-writer.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 60) -> None:
        self.ready_file.unlink(missing_ok=True)
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "memory-writer"],
                env={**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # never outlive a crashed test run
            )
        self.starts += 1
        wait_for(lambda: self._alive() and self.ready_file.exists(), timeout, 0.05, "the writer to join")

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"writer exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
            )
        return True

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PersistentBroker:
    """Tansu with the ``s3://`` storage engine against a local S3-compatible server (moto), so that its
    data and committed offsets survive a broker restart."""

    def __init__(self, settings: Settings, workdir: Path, broker_port: int, s3_port: int) -> None:
        self.settings = settings
        self.workdir = workdir
        self.listener = f"tcp://127.0.0.1:{broker_port}"
        self.s3_url = f"http://127.0.0.1:{s3_port}"
        self.s3_port = s3_port
        self.moto: subprocess.Popen | None = None
        self.broker: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": self.s3_url,
            "AWS_ALLOW_HTTP": "true",
        }

    def start_storage(self) -> None:
        moto = str(Path(sys.executable).with_name("moto_server"))
        with (self.workdir / "moto.log").open("ab") as log:
            self.moto = subprocess.Popen(
                [moto, "-H", "127.0.0.1", "-p", str(self.s3_port)], stdout=log, stderr=subprocess.STDOUT
            )
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

        def bucket() -> bool:
            try:
                s3.create_bucket(Bucket="tansu")
                return True
            except Exception as exc:
                return "BucketAlready" in str(exc)

        wait_for(bucket, 30, 0.2, "the S3 server")

    def start_broker(self) -> None:
        with (self.workdir / "tansu.log").open("ab") as log:
            self.broker = subprocess.Popen(
                [
                    tansu_binary(self.settings),
                    "broker",
                    "--listener-url",
                    self.listener,
                    "--advertised-listener-url",
                    self.listener,
                    "--storage-engine",
                    "s3://tansu/",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        time.sleep(0.2)

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.terminate()
            self.broker.wait(timeout=20)
            self.broker = None

    def stop(self) -> None:
        self.stop_broker()
        if self.moto is not None:
            self.moto.terminate()
            self.moto.wait(timeout=20)
