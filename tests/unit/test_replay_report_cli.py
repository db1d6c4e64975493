"""The report and the ``replay`` subcommand end to end over fakes: no network, no Ray, no real model."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ops.replay import cli
from ops.replay.report import build_report, render_markdown
from ops.replay.runner import Outcome, ReplayResult
from ops.replay.stream import read_stream
from ops.settings import load_settings
from tests.unit.test_replay_runner import FakeClock, FakeSystem


class FakeEncoder:
    """Hashed bag of words: similar texts get similar unit vectors, deterministically."""

    fingerprint = "fake"
    max_length = 32
    dim = 64

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def write_stream(path: Path, n: int = 80) -> Path:
    rows = []
    for i in range(n):
        label = ["billing", "bug", "praise"][i % 3]
        topic = {
            "billing": "charged twice invoice refund payment",
            "bug": "crash error button broken screen",
            "praise": "love great thanks wonderful app",
        }[label]
        rows.append(
            {
                "id": f"t{i}",
                "ts": f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}",
                "text": f"{topic} case {i % 4} ticket {i}",
                "label": label,
                "domain": "support" if i % 2 else "shop",
                "source": "test",
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture()
def fake_deployment(monkeypatch):
    system = FakeSystem(FakeClock(), version_every=40, new_model_label="bug")
    encoder = FakeEncoder()
    monkeypatch.setattr(cli, "HttpPredictClient", lambda url: _Closing(system))
    monkeypatch.setattr(cli, "KafkaFeedbackSink", lambda kafka: _Closing(system))
    monkeypatch.setattr(cli, "_encoder", lambda settings: encoder)
    return system, encoder


class _Closing:
    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def close(self) -> None:
        pass


def test_replay_command_writes_the_full_report(tmp_path: Path, fake_deployment, capsys) -> None:
    system, encoder = fake_deployment
    stream = write_stream(tmp_path / "tickets.jsonl")
    out = tmp_path / "out"
    args = parse(
        [str(stream), "--url", "http://fake:1", "--out", str(out), "--no-progress", "--fix-samples", "3",
         "--rollout-probes", "4", "--probe-every", "5", "--window", "10"]
    )  # fmt: skip
    assert cli.run(args, load_settings()) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["stream"] == {
        "path": str(stream),
        "events": 80,
        "warmup": 8,
        "evaluated": 72,
        "labels": ["billing", "bug", "praise"],
        "domains": ["shop", "support"],
        "format_notes": {"events_with_extra_fields": 80, "events_in_file": 80, "events": 80},
    }
    assert set(report["systems"]) == {"driftserve", "static", "retrain", "ncm", "knn"}
    assert all(v["n"] == 72 for v in report["systems"].values())
    assert set(report["per_domain"]["knn"]) == {"shop", "support"}
    assert report["bar"]["best_baseline"] in {"static", "retrain", "ncm", "knn"}
    assert isinstance(report["bar"]["meets_bar"], bool)
    assert report["rollouts"] and report["rollouts"][0]["flips"]["n"] >= 0
    assert report["latency_ms"]["n"] == 72 and report["errors"]["total"] == 0
    assert report["feedback_to_fix"]["followed"] <= 3
    assert report["config"]["url"] == "http://fake:1" and report["config"]["settings"] is None
    events = (out / "events.jsonl").read_text().splitlines()
    assert len(events) == 72 and set(json.loads(events[0])["baselines"]) == set(report["baselines"])
    md = (out / "report.md").read_text()
    for heading in ("## Prequential quality", "## Feedback to fix", "## Rollouts seen", "## Request latency"):
        assert heading in md
    for png in ("quality_over_time.png", "latency.png", "per_domain.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in md
    printed = capsys.readouterr().out
    assert "vs best baseline" in printed and "report.json" in printed

    # A rerun reuses the cached embeddings: only the near-duplicate probes are encoded again.
    calls = encoder.calls
    system.received.clear()
    assert cli.run(args, load_settings()) == 0
    assert encoder.calls - calls <= 1


def test_bad_input_is_refused_before_any_slow_work(tmp_path: Path, fake_deployment, capsys) -> None:
    _, encoder = fake_deployment
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "ts": 1, "text": "t", "label": "x"}\n{"id": "b"}\n')
    assert cli.run(parse([str(bad), "--url", "http://x:1"]), load_settings()) == 2
    assert f"{bad}:2: missing field(s) ts, text, label" in capsys.readouterr().err
    stream = write_stream(tmp_path / "s.jsonl", 10)
    for argv, message in [
        (["--bootstrap", "h:1"], "--bootstrap goes with --url"),
        (["--url", "ftp://x"], "must start with http"),
        (["--url", "http://x:1", "--baselines", "static,oracle"], "unknown baseline(s) oracle"),
        (["--url", "http://x:1", "--warmup", "1.5"], "warm-up share"),
    ]:
        assert cli.run(parse([str(stream), *argv]), load_settings()) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse([str(stream), "--rate", "5", "--time-scale", "2"])
    assert encoder.calls == 0


def test_embedded_state_dir_is_only_wiped_when_replay_made_it(tmp_path: Path) -> None:
    first = cli._fresh_state_dir(tmp_path)
    (first / "leftover").write_text("x")
    again = cli._fresh_state_dir(tmp_path)
    assert not (again / "leftover").exists()
    other = tmp_path / "theirs"
    (other / "stack").mkdir(parents=True)
    (other / "stack" / "precious").write_text("x")
    with pytest.raises(ValueError, match="not created by driftserve replay"):
        cli._fresh_state_dir(other)


def test_an_aborted_replay_is_compared_on_the_events_it_reached(tmp_path: Path) -> None:
    stream = read_stream(write_stream(tmp_path / "s.jsonl", 20))
    result = ReplayResult(n_warmup=2, aborted="deployment down")
    for pos in range(5):
        e = stream.events[2 + pos]
        result.outcomes.append(
            Outcome(pos, e.id, e.domain, e.label, e.label, "v1", None, False, 0.01, None, 0.0, 0.0)
        )
    baselines = {"static": ["billing"] * 18}
    report = build_report(
        stream=stream,
        n_warmup=2,
        result=result,
        baselines=baselines,
        baseline_help={"static": "s"},
        config={},
        window=3,
    )
    assert report["systems"]["static"]["n"] == 5
    assert report["bar"]["delta_points"] > 0 and report["bar"]["meets_goal"] is True
    assert "Replay stopped early" in render_markdown(report)


@pytest.mark.parametrize(
    ("wait", "url", "overrides", "warned"),
    [
        (300.0, None, {}, True),  # defaults: 10 answers per stage, none during the warm-up
        (300.0, None, {"canary_min_requests": 0}, False),
        (300.0, None, {"rollout_enabled": False}, False),
        (0.0, None, {}, False),
        (300.0, "http://deployment:8000", {}, False),  # a remote deployment may have other traffic
    ],
)
def test_wait_adapter_warns_when_no_warm_up_adapter_can_be_promoted(wait, url, overrides, warned) -> None:
    args = argparse.Namespace(wait_adapter=wait, url=url)
    warning = cli.wait_adapter_warning(args, load_settings(**overrides))
    assert (warning is not None) == warned
    if warned:
        assert "--canary-min-requests 0" in warning and "(10)" in warning


def test_the_report_gives_each_model_versions_accuracy_beside_the_best_baseline(tmp_path: Path) -> None:
    stream = read_stream(write_stream(tmp_path / "s.jsonl", 12))
    result = ReplayResult(n_warmup=2)
    answers = ["v1", "v1", "v1", "v2", "v2", "v1", "v2", "v2", "v2", "v2"]  # v1 answers again mid-rollout
    for pos, version in enumerate(answers):
        e = stream.events[2 + pos]
        predicted = e.label if version == "v2" or pos == 0 else "wrong"
        result.outcomes.append(
            Outcome(pos, e.id, e.domain, e.label, predicted, version, None, False, 0.01, None, 0.0, 0.0)
        )
    truth = [e.label for e in stream.events[2:]]
    baseline = [t if i % 2 else "nope" for i, t in enumerate(truth)]
    report = build_report(
        stream=stream,
        n_warmup=2,
        result=result,
        baselines={"knn": baseline},
        baseline_help={"knn": "k"},
        config={},
        window=3,
    )
    v1, v2 = report["driftserve"]["by_version"]
    assert (v1["version"], v1["first_event"], v1["answers"], v1["accuracy"]) == ("v1", 0, 4, 0.25)
    assert v1["best_baseline_accuracy"] == 0.5  # events 0, 1, 2, 5: right at 1 and 5
    assert (v2["version"], v2["first_event"], v2["answers"], v2["accuracy"]) == ("v2", 3, 6, 1.0)
    assert v2["best_baseline_accuracy"] == 0.5  # events 3, 4, 6-9: right at 3, 7, 9
    md = render_markdown(report)
    assert "| v1 | 0 | 4 | 0.250 | 0.500 |" in md
    # What produced it: the installed version and, from a git checkout, its commit.
    software = report["software"]
    assert software["driftserve"]
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert len(software["commit"]) == 40 and isinstance(software["dirty"], bool)
        assert f"commit {software['commit'][:12]}" in md
