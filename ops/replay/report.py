"""The replay report: one JSON document (the record), a markdown rendering (for people), PNG plots, and
the per-event answers (for audits). Everything is derived from the runner's result and the baselines'
predictions over exactly the same events."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ops.replay import metrics
from ops.replay.runner import ReplayResult
from ops.replay.stream import Stream

SYSTEM = "driftserve"
REPORT_SCHEMA = 1
BAR_GOAL_POINTS = 2.0


def build_report(
    *,
    stream: Stream,
    n_warmup: int,
    result: ReplayResult,
    baselines: dict[str, list[str | None]],
    baseline_help: dict[str, str],
    config: dict[str, Any],
    window: int,
    produced_by: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``produced_by``: :func:`software` taken when the run started (the tree may change while it runs)."""
    outcomes = result.outcomes
    n = len(outcomes)
    truth = [o.label for o in outcomes]
    domains = [o.domain for o in outcomes]
    preds: dict[str, Sequence[str | None]] = {SYSTEM: [o.predicted for o in outcomes]}
    for name, p in baselines.items():
        preds[name] = p[:n]  # an aborted replay is compared on the events it reached
    systems = {name: metrics.summary(truth, p) for name, p in preds.items()}
    best = max(baselines, key=lambda b: systems[b]["accuracy"] or 0.0) if baselines and n else None
    ours = systems[SYSTEM]["accuracy"]
    bar: dict[str, Any] = {"best_baseline": best}
    if best is not None and ours is not None:
        theirs = systems[best]["accuracy"] or 0.0
        delta = 100.0 * (ours - theirs)
        bar.update(
            driftserve_accuracy=ours,
            best_baseline_accuracy=theirs,
            delta_points=round(delta, 2),
            meets_bar=ours >= theirs,
            meets_goal=delta >= BAR_GOAL_POINTS,
        )
    answered = [o for o in outcomes if o.error is None]
    fixes = result.fixes
    fixed_s = [f.seconds for f in fixes if f.fixed and f.seconds is not None]
    sims = [f.similarity for f in fixes if f.similarity is not None]
    return {
        "schema": REPORT_SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "software": produced_by if produced_by is not None else software(),
        "stream": {
            "path": stream.path,
            "events": len(stream.events),
            "warmup": n_warmup,
            "evaluated": n,
            "labels": stream.labels,
            "domains": [d if d is not None else "(none)" for d in stream.domains],
            "format_notes": stream.stats,
        },
        "config": config,
        "baselines": {name: baseline_help.get(name, "") for name in baselines},
        "systems": systems,
        "bar": bar,
        "over_time": {
            "window": window,
            "points": {name: metrics.sliding(truth, p, window) for name, p in preds.items()},
        },
        "per_domain": {name: metrics.per_group(truth, p, domains) for name, p in preds.items()},
        "driftserve": {
            "answered": len(answered),
            "no_label": sum(1 for o in answered if o.predicted is None),
            "compensated_share": _share(sum(o.compensated for o in answered), len(answered)),
            "adapter_share": _share(sum(o.adapter is not None for o in answered), len(answered)),
            "model_versions": sorted({o.model_version for o in answered if o.model_version}),
            "by_version": _by_version(outcomes, preds.get(best) if best else None),
        },
        "feedback_to_fix": {
            "followed": len(fixes),
            "fixed": len(fixed_s),
            "fixed_share": _share(len(fixed_s), len(fixes)),
            "seconds": metrics.percentiles(fixed_s, (50, 90)),
            "near_duplicate_similarity_median": _median(sims),
            "timeout_s": config.get("fix_timeout_s"),
            "samples": [dataclasses.asdict(f) for f in fixes],
        },
        "rollouts": [dataclasses.asdict(r) for r in result.rollouts],
        "background_flips": result.background_flips,
        "version_reverts": result.version_reverts,
        "latency_ms": {
            k: (round(v * 1000, 2) if isinstance(v, float) and k != "n" else v)
            for k, v in metrics.percentiles(
                [o.latency_s for o in outcomes if o.latency_s is not None]
            ).items()
        },
        "errors": {
            "total": sum(result.errors.values()),
            "by_kind": dict(result.errors),
            "examples": result.error_examples,
        },
        "warmup": result.warmup,
        "pacing": result.pacing,
        "probe_requests": result.probe_requests,
        "timings_s": result.timings_s,
        "aborted": result.aborted,
    }


def software() -> dict[str, Any]:
    """What produced the report: the installed driftserve and, run from a git checkout, its commit and
    whether the tree had uncommitted changes (two runs are comparable only if these say so)."""
    out: dict[str, Any] = {"driftserve": None, "commit": None, "dirty": None}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        out["driftserve"] = importlib.metadata.version("driftserve")
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            out["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout: the version is enough
        pass
    return out


def _by_version(outcomes: Sequence[Any], baseline: Sequence[str | None] | None) -> list[dict[str, Any]]:
    """Accuracy of the answers each model version gave (in order of its first answer), beside the best
    baseline's on exactly those events: which rollout helped, and where the system trailed."""
    groups: dict[str, list[int]] = {}
    for i, o in enumerate(outcomes):
        if o.error is None and o.model_version:
            groups.setdefault(o.model_version, []).append(i)
    out = []
    for version, rows in groups.items():
        right = sum(outcomes[i].predicted == outcomes[i].label for i in rows)
        row: dict[str, Any] = {
            "version": version,
            "first_event": rows[0],
            "answers": len(rows),
            "accuracy": right / len(rows),
        }
        if baseline is not None:
            row["best_baseline_accuracy"] = sum(baseline[i] == outcomes[i].label for i in rows) / len(rows)
        out.append(row)
    return out


def _latency_ms(outcomes: Sequence[Any]) -> dict[str, float | None]:
    seconds = metrics.percentiles([o.latency_s for o in outcomes if o.latency_s is not None])
    return {k: (round(v * 1000, 2) if isinstance(v, float) and k != "n" else v) for k, v in seconds.items()}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _median(values: Sequence[float]) -> float | None:
    return metrics.percentiles(values, (50,))["p50"]


# -- files -----------------------------------------------------------------------------------------------
def write_events(path: Path, result: ReplayResult, baselines: dict[str, list[str | None]]) -> None:
    """Per evaluated event: the system's answer and each baseline's, one JSON object a line."""
    with path.open("w") as fh:
        for o in result.outcomes:
            row = dataclasses.asdict(o)
            row["baselines"] = {name: p[o.position] for name, p in baselines.items()}
            fh.write(json.dumps(row) + "\n")


def write_report(report: dict[str, Any], out_dir: Path, result: ReplayResult, baselines: dict) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "events.jsonl"]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_events(paths[2], result, baselines)
    plots = write_plots(report, result, out_dir)
    paths[1].write_text(render_markdown(report, [p.name for p in plots]))
    return paths + plots


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any], plots: Sequence[str] = ()) -> str:
    s, bar = report["stream"], report["bar"]
    lines = [
        f"# driftserve replay: {Path(s['path']).name}",
        "",
        f"{s['events']} events ({s['warmup']} warm-up, fed back only; {s['evaluated']} evaluated "
        f"prequentially), labels {', '.join(s['labels'])}; pacing: {report['pacing'].get('mode')}; "
        f"domain {'hidden' if report['config'].get('hide_domain') else 'sent'} with each request.",
        "",
    ]
    if len(s["labels"]) < 2:
        lines += [
            "**Only one label in these events: every system is trivially right; no drift is measured.**",
            "",
        ]
    if report.get("aborted"):
        lines += [f"**Replay stopped early:** {report['aborted']}", ""]
    lines += [
        "## Prequential quality",
        "",
        "| system | accuracy | macro-F1 | what it is |",
        "| --- | --- | --- | --- |",
    ]
    best_acc = max((v["accuracy"] or 0.0) for v in report["systems"].values())
    for name, v in report["systems"].items():
        acc = _fmt(v["accuracy"])
        if v["accuracy"] is not None and v["accuracy"] == best_acc:
            acc = f"**{acc}**"
        what = "the deployment under test" if name == SYSTEM else report["baselines"].get(name, "")
        lines.append(f"| {name} | {acc} | {_fmt(v['macro_f1'])} | {what} |")
    if bar.get("best_baseline") and "delta_points" in bar:
        verdict = (
            "meets the goal" if bar["meets_goal"] else ("meets the bar" if bar["meets_bar"] else "BELOW")
        )
        lines += [
            "",
            f"driftserve vs the best baseline ({bar['best_baseline']}): {bar['delta_points']:+.2f} points "
            f"of accuracy: {verdict} (bar: at least equal; goal: +{BAR_GOAL_POINTS:g} points).",
        ]
    d = report["driftserve"]
    lines += [
        "",
        f"Answers: {d['answered']} ({d['no_label']} without a label), compensated by the error memory: "
        f"{_fmt(d['compensated_share'])}, from an adapter: {_fmt(d['adapter_share'])}.",
        "",
    ]
    if d.get("by_version"):
        lines += [
            f"By model version (the best baseline, {bar.get('best_baseline')}, on the same events):",
            "",
            "| version | first answered event | answers | accuracy | best baseline |",
            "| --- | --- | --- | --- | --- |",
        ]
        for v in d["by_version"]:
            lines.append(
                f"| {v['version']} | {v['first_event']} | {v['answers']} | {_fmt(v['accuracy'])} | "
                f"{_fmt(v.get('best_baseline_accuracy'))} |"
            )
        lines.append("")
    domains = next(iter(report["per_domain"].values()), {})
    if len(domains) > 1:
        names = list(report["per_domain"])
        lines += ["## Per domain (accuracy)", "", "| domain | n | " + " | ".join(names) + " |"]
        lines.append("| --- | --- |" + " --- |" * len(names))
        for dom, v in domains.items():
            row = [_fmt(report["per_domain"][name][dom]["accuracy"]) for name in names]
            lines.append(f"| {dom} | {v['n']} | " + " | ".join(row) + " |")
        lines.append("")
    f = report["feedback_to_fix"]
    lines += [
        "## Feedback to fix",
        "",
        f"{f['followed']} errors followed (a near-duplicate of the text, median cosine similarity "
        f"{_fmt(f['near_duplicate_similarity_median'])}, was wrong too before the label was sent); "
        f"{f['fixed']} fixed within {_fmt(f['timeout_s'], 0)} s; time to fix p50 "
        f"{_fmt(f['seconds']['p50'], 2)} s, p90 {_fmt(f['seconds']['p90'], 2)} s, "
        f"max {_fmt(f['seconds']['max'], 2)} s.",
        "",
        "## Rollouts seen",
        "",
    ]
    if report["rollouts"]:
        lines += [
            "| at event | domain | old -> new | probes | NFR | PFR | acc old -> new | probe age |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["rollouts"]:
            fl = r["flips"]
            lines.append(
                f"| {r['position']} ({r['at_s']:.0f} s) | {r['domain']} | {r['old_version']} -> "
                f"{r['new_version']} | {fl.get('n', 0)} | {_fmt(fl.get('nfr'))} | {_fmt(fl.get('pfr'))} | "
                f"{_fmt(r['old_accuracy'])} -> {_fmt(r['new_accuracy'])} | {r['probe_age_events']} events |"
            )
    else:
        lines.append("No model version change was seen.")
    bg = report["background_flips"]
    lines += [
        "",
        f"Background churn without a rollout (same probes answered again later, same version): "
        f"NFR {_fmt(bg.get('nfr'))}, PFR {_fmt(bg.get('pfr'))} over {bg.get('n', 0)} events. "
        f"Returns to an earlier version: {report['version_reverts']}.",
        "",
    ]
    lat = report["latency_ms"]
    lines += [
        "## Request latency (ms, client side)",
        "",
        "| p50 | p90 | p95 | p99 | mean | max | n |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {_fmt(lat['p50'], 1)} | {_fmt(lat['p90'], 1)} | {_fmt(lat['p95'], 1)} | {_fmt(lat['p99'], 1)} "
        f"| {_fmt(lat['mean'], 1)} | {_fmt(lat['max'], 1)} | {lat['n']} |",
        "",
        f"Probe requests (not counted above or in accuracy): {report['probe_requests']}.",
        "",
        "## Errors",
        "",
    ]
    errors = report["errors"]
    if errors["total"]:
        lines += ["| kind | count |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(errors["by_kind"].items())]
        lines += ["", "First examples:", ""]
        lines += [f"- `{e['kind']}` {e['event_id'] or ''}: {e['message']}" for e in errors["examples"][:5]]
    else:
        lines.append("None.")
    w, t = report["warmup"], report["timings_s"]
    lines += [
        "",
        "## Run",
        "",
        f"Warm-up: {w.get('events')} events fed back in {_fmt(w.get('seconds'), 1)} s "
        f"(memory entries {w.get('memory_entries_before')} -> {w.get('memory_entries_after', '-')}). "
        f"Timings (s): " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in t.items()) + ".",
        "",
    ]
    sw = report.get("software") or {}
    if sw.get("driftserve") or sw.get("commit"):
        commit = sw.get("commit")
        lines += [
            f"driftserve {sw.get('driftserve') or '(not installed)'}"
            + (
                f", commit {commit[:12]}{' with uncommitted changes' if sw.get('dirty') else ''}"
                if commit
                else ""
            )
            + ".",
            "",
        ]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(report: dict[str, Any], result: ReplayResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    points = report["over_time"]["points"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, series in points.items():
        if not series:
            continue
        x = [p["end"] for p in series]
        style = {"linewidth": 2.5, "color": "black", "zorder": 5} if name == SYSTEM else {"linewidth": 1.2}
        for ax, key in zip(axes, ("accuracy", "macro_f1"), strict=True):
            ax.plot(x, [p[key] for p in series], label=name, **style)
    for ax, key in zip(axes, ("accuracy", "macro-F1"), strict=True):
        for r in report["rollouts"]:
            ax.axvline(r["position"], color="tab:red", linestyle=":", linewidth=0.8)
        ax.set_ylabel(f"{key} (window {report['over_time']['window']})")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title(f"{Path(report['stream']['path']).name}: prequential quality (red: rollouts)")
    axes[1].set_xlabel("evaluated events")
    fig.tight_layout()
    paths.append(out_dir / "quality_over_time.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    latencies = [o.latency_s * 1000 for o in result.outcomes if o.latency_s is not None]
    if latencies:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.hist(latencies, bins=60, color="tab:blue")
        for q in ("p50", "p99"):
            value = report["latency_ms"][q]
            ax.axvline(value, color="black", linestyle="--", linewidth=0.8)
            ax.text(value, ax.get_ylim()[1] * 0.9, f" {q} {value:.0f} ms", fontsize=8)
        ax.set_xlabel("predict latency (ms, client side)")
        ax.set_ylabel("requests")
        fig.tight_layout()
        paths.append(out_dir / "latency.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    per_domain = report["per_domain"]
    names = list(per_domain)
    domains = list(next(iter(per_domain.values()), {}))
    if domains:
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(domains) * len(names) / 3), 4))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + i * width for j in range(len(domains))]
            ax.bar(xs, [per_domain[name][d]["accuracy"] or 0 for d in domains], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
        ax.set_ylim(0, 1)
        ax.set_ylabel("prequential accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "per_domain.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
