from __future__ import annotations

import socket
import subprocess

import pytest
from pydantic import ValidationError

from ops import stack
from ops.cli import build_parser, main
from ops.settings import Settings, load_settings


def test_environment_then_overrides(monkeypatch):
    monkeypatch.setenv("DRIFTSERVE_HTTP_PORT", "9100")
    monkeypatch.setenv("DRIFTSERVE_COMPENSATION_K", "5")
    s = load_settings(compensation_k=7, http_host=None)
    assert s.http_port == 9100 and s.compensation_k == 7 and s.http_host == "127.0.0.1"
    assert s.compensation().k == 7
    assert s.training().guard is False and load_settings(learner_guard=True).training().guard is True


def test_a_domain_gate_override_changes_only_what_it_names():
    s = load_settings(
        gate_epsilon=0.3, gate_max_nfr=0.4, gate_policy_overrides='{"tenant-a": {"max_nfr": 0.01}}'
    )
    policy = s.rollout()
    assert policy.gate_for("tenant-a").max_nfr == 0.01
    assert policy.gate_for("tenant-a").epsilon == 0.3  # the deployment's, not the built-in default
    assert policy.gate_for("tenant-b") == policy.gate and policy.gate.max_nfr == 0.4


def test_unknown_and_invalid_settings_are_errors(monkeypatch):
    with pytest.raises(ValidationError):
        load_settings(no_such_field=1)
    with pytest.raises(ValidationError):
        load_settings(compensation_sim_low=0.9, compensation_sim_high=0.5)


def test_redis_password_is_secret_and_goes_into_the_url():
    s = load_settings(redis_url="redis://10.0.0.5:6380/2", redis_password="s3cret")
    assert "s3cret" not in repr(s)
    assert s.redis().url == "redis://:s3cret@10.0.0.5:6380/2"


def test_settings_env_roundtrip(monkeypatch, tmp_path):
    original = load_settings(state_dir=tmp_path, redis_password="pw", learner_enabled=False, http_port=8123)
    for key, value in stack.settings_env(original).items():
        monkeypatch.setenv(key, value)
    rebuilt = Settings()
    assert rebuilt.model_dump() == original.model_dump() | {"redis_password": rebuilt.redis_password}
    assert rebuilt.redis_password.get_secret_value() == "pw"


def test_every_setting_is_a_flag():
    args = build_parser().parse_args(["up", "--http-port", "8111", "--compensation-tau", "0.2"])
    assert args.setting_http_port == "8111" and args.setting_compensation_tau == "0.2"
    assert all(f"setting_{name}" in vars(args) for name in Settings.model_fields)


def test_cli_reports_invalid_settings(capsys):
    assert main(["up", "--http-port", "notaport"]) == 2
    assert "http_port" in capsys.readouterr().err


def test_port_in_use_gives_a_clear_error():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(stack.StackError, match=f"127.0.0.1:{port} is already in use.*--http-port"):
            stack.check_port_free("127.0.0.1", port, "HTTP", "--http-port")


def test_missing_binaries_give_clear_errors(tmp_path):
    with pytest.raises(stack.StackError, match="apt-get install redis-server"):
        stack.redis_binary(load_settings(redis_server_bin="no-such-redis-server"))
    with pytest.raises(stack.StackError, match="DRIFTSERVE_TANSU_BIN"):
        stack.tansu_binary(load_settings(tansu_bin=str(tmp_path / "missing")))
    assert stack.tansu_binary(load_settings()).endswith("tansu")


def test_host_port_parsing():
    assert stack.host_port("127.0.0.1:19092", 9092) == ("127.0.0.1", 19092)
    assert stack.host_port("redis://127.0.0.1:16379/0", 6379) == ("127.0.0.1", 16379)
    assert stack.host_port("redis://localhost/0", 6379) == ("localhost", 6379)


class _Proc:
    """A stand-in child process that records what is done to it."""

    def __init__(self, name: str, events: list[str], exits_on_term: bool = True) -> None:
        self.name, self.events, self.exits_on_term, self.code = name, events, exits_on_term, None

    def poll(self):
        return self.code

    def terminate(self) -> None:
        self.events.append(f"term {self.name}")
        if self.exits_on_term:
            self.code = 0

    def wait(self, timeout=None):
        if self.code is None:
            raise subprocess.TimeoutExpired(self.name, timeout)
        self.events.append(f"exited {self.name}")
        return self.code

    def kill(self) -> None:
        self.events.append(f"kill {self.name}")
        self.code = -9


def test_the_stack_stops_its_services_before_redis_and_the_broker():
    events: list[str] = []
    embedded = object.__new__(stack.EmbeddedStack)
    embedded._ray_started = False
    names = ["tansu", "redis", "memory-writer", "learner", "rollout-controller"]
    # The learner ignores SIGTERM here (its wait times out at once): it is killed, and only then Redis goes.
    embedded._procs = [(n, _Proc(n, events, exits_on_term=n != "learner")) for n in names]
    embedded.stop()
    assert events == [
        "term rollout-controller",
        "term learner",
        "term memory-writer",
        "exited rollout-controller",
        "kill learner",  # did not exit in time: killed before Redis goes
        "exited learner",
        "exited memory-writer",
        "term redis",
        "term tansu",
        "exited redis",
        "exited tansu",
    ]
    assert embedded._procs == []
