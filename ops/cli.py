"""``driftserve`` command line. Every Settings field is also a flag (``--http-port`` for ``http_port``);
flags override DRIFTSERVE_* environment variables, which override the defaults."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pydantic import ValidationError

from ops.settings import Settings, load_settings

log = logging.getLogger("driftserve")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also DRIFTSERVE_<NAME> in the environment)")
    for name, field in Settings.model_fields.items():
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"setting_{name}",
            default=None,
            metavar="V",
            help=(field.description or "") + f" [default: {field.default}]",
        )


def _settings(args: argparse.Namespace, **forced) -> Settings:
    values = {k.removeprefix("setting_"): v for k, v in vars(args).items() if k.startswith("setting_")}
    values.update(forced)
    return load_settings(**values)


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from ops.stack import EmbeddedStack, StackError
    from ops.wiring import stop_on_signals

    stop = stop_on_signals()
    stack = EmbeddedStack(settings)
    try:
        stack.start()
    except StackError as exc:
        print(f"driftserve: {exc}", file=sys.stderr)
        return 2
    # ray.init installs native handlers that abort on SIGTERM; take the signals back for a clean stop.
    stop = stop_on_signals(stop)
    try:
        if args.command == "demo":
            from ops.demo import run_demo

            return run_demo(stack)
        print("Ctrl-C or SIGTERM stops everything.", flush=True)
        while not stop.wait(1.0):
            stack._check_alive()
        return 0
    except StackError as exc:
        print(f"driftserve: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        print("stopped.", flush=True)


def _cmd_memory_writer(_args: argparse.Namespace, settings: Settings) -> int:
    from ops.stack import mark_ready
    from ops.wiring import memory_writer, stop_on_signals

    stop = stop_on_signals()
    memory_writer(settings).run(stop, on_ready=lambda: mark_ready(settings, "memory-writer"))
    return 0


def _cmd_learner(_args: argparse.Namespace, settings: Settings) -> int:
    from ops.stack import mark_ready
    from ops.wiring import learner, stop_on_signals

    stop = stop_on_signals()
    learner(settings).run(stop, on_ready=lambda: mark_ready(settings, "learner"))
    return 0


def _cmd_rollout_controller(_args: argparse.Namespace, settings: Settings) -> int:
    from ops.stack import mark_ready
    from ops.wiring import rollout_controller, stop_on_signals

    stop = stop_on_signals()
    rollout_controller(settings).run(stop, on_ready=lambda: mark_ready(settings, "rollout-controller"))
    return 0


def _registry_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["ls", "show"], help="ls: versions and states; show: one version")
    parser.add_argument("domain", nargs="?", default=None)
    parser.add_argument("version", nargs="?", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON")


def _rollout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["status", "promote", "rollback", "pause", "resume"])
    parser.add_argument("domain", nargs="?", default=None)
    parser.add_argument("--version", default=None, help="promote: this version instead of the candidate")
    parser.add_argument("--reason", default="", help="recorded in the audit log")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _print(data, as_json: bool, render) -> None:
    import json

    print(json.dumps(data, indent=2, default=str) if as_json else render(data))


def _render_listing(data: dict) -> str:
    lines = [f"{'DOMAIN':<20} {'VERSION':<28} {'STATE':<12} {'PARENT':<28} ACC/CUR/NFR"]
    for r in data["versions"]:
        m = r["metrics"]
        scores = "/".join(
            f"{m[k]:.3f}" if k in m else "-" for k in ("holdout_accuracy", "current_accuracy", "nfr")
        )
        mark = "*" if data["active"].get(r["domain"]) == r["version"] else " "
        lines.append(
            f"{r['domain']:<20} {mark}{r['version']:<27} {r['state']:<12} {r['parent'] or '-':<28} {scores}"
        )
    for domain, ro in data["rollouts"].items():
        lines.append(
            f"rollout {domain}: {ro['version']} {ro['stage']} weight={ro['weight']} "
            f"passes={ro['passes']} failures={ro['failures']}{' PAUSED' if ro['paused'] else ''}"
        )
    return "\n".join(lines)


def _render_status(data: dict) -> str:
    lines = [f"active: {data['active'] or '-'}"]
    for domain, ro in data["rollouts"].items():
        lines.append(
            f"{domain}: {ro['version']} in {ro['stage']} weight={ro['weight']} passes={ro['passes']} "
            f"failures={ro['failures']}{' PAUSED' if ro['paused'] else ''}"
        )
    lines.append(f"replicas: {len(data['replicas'])} live")
    for e in data["recent"]:
        when = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
        lines.append(f"  {when} {e['type']:<12} {e['domain']}/{e['version']} by {e['actor']}: {e['reason']}")
    return "\n".join(lines)


def _operator() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers
        return "cli"


def _cmd_registry(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from ops.wiring import registry_admin
    from serving.errors import ServingError

    admin = registry_admin(settings)
    try:
        if args.action == "ls":
            _print(admin.listing(args.domain), args.json, _render_listing)
        else:
            if not (args.domain and args.version):
                print("driftserve: registry show needs DOMAIN VERSION", file=sys.stderr)
                return 2
            print(json.dumps(admin.show(args.domain, args.version), indent=2, default=str))
    except ServingError as exc:
        print(f"driftserve: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _cmd_rollout(args: argparse.Namespace, settings: Settings) -> int:
    from ops.wiring import registry_admin
    from serving.errors import ServingError

    admin = registry_admin(settings)
    if args.action == "status":
        _print(admin.status(args.domain), args.json, _render_status)
        return 0
    if not args.domain:
        print(f"driftserve: rollout {args.action} needs a DOMAIN", file=sys.stderr)
        return 2
    reason = args.reason or f"operator {args.action}"
    try:
        if args.action == "promote":
            event = admin.promote(args.domain, args.version, actor=_operator(), reason=reason)
        elif args.action == "rollback":
            event = admin.rollback(args.domain, actor=_operator(), reason=reason)
        else:
            event = admin.pause(args.domain, args.action == "pause", actor=_operator(), reason=reason)
    except ServingError as exc:
        print(f"driftserve: {exc.message}", file=sys.stderr)
        return 1
    print(f"{event['type']} {event['domain']}/{event['version']}: {event['reason']}")
    return 0


def _memory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=["rebuild"], help="rebuild: reconstruct the error memory from the log"
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--from-offset", type=int, default=None, help="start at this offset in every partition"
    )
    start.add_argument(
        "--from-time", default=None, help="start at this time (ISO-8601 or seconds since the epoch)"
    )


def _parse_time(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        from datetime import datetime

        return datetime.fromisoformat(value).timestamp()


def _cmd_memory(args: argparse.Namespace, settings: Settings) -> int:
    from ops.memory_admin import Rebuilder

    from_time = _parse_time(args.from_time) if args.from_time else None
    report = Rebuilder(settings).run(from_offset=args.from_offset, from_time=from_time)
    print(
        f"error memory rebuilt as generation {report.generation}: {report.added} entries from "
        f"{report.events} events ({report.forgets} forget events honoured, {report.skipped_invalid} invalid "
        f"skipped, {report.caught_up} caught up while rebuilding) in {report.seconds:.1f}s"
    )
    return 0


def _migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to-model",
        required=True,
        help="the new base: a model directory or a known name (all-mpnet-base-v2, sre-embedding-model)",
    )
    parser.add_argument("--domains", nargs="*", default=None, help="only these domains (default: all)")
    parser.add_argument(
        "--skip-memory", action="store_true", help="transfer adapters only; do not re-key the error memory"
    )
    parser.add_argument("--transfer-steps", type=int, default=300, help="distillation steps per domain")
    parser.add_argument(
        "--synthetic-per-example", type=int, default=3, help="perturbed texts per buffered example"
    )


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from learners.transfer import TransferConfig
    from ops.migrate import migrate_base, migration_settings
    from serving.models import ModelUnavailable

    base = TransferConfig()
    cfg = replace(
        base,
        synthetic_per_example=args.synthetic_per_example,
        train=replace(base.train, max_steps=args.transfer_steps),
    )
    try:
        report = migrate_base(
            settings, args.to_model, domains=args.domains, rebuild_memory=not args.skip_memory, cfg=cfg
        )
    except (ModelUnavailable, ValueError) as exc:
        print(f"driftserve: {exc}", file=sys.stderr)
        return 2
    if report.memory is not None:
        m = report.memory
        print(
            f"error memory re-keyed for {report.to_fingerprint[:12]}: generation {m.generation}, "
            f"{m.added} entries from {m.events} events ({m.forgets} forgets honoured) in {m.seconds:.1f}s"
        )
    for domain, row in report.adapters.items():
        metrics = row["metrics"]
        print(
            f"{domain}: {row['parent']} -> {row['version']}  holdout accuracy teacher "
            f"{metrics.get('teacher_accuracy', float('nan')):.3f} student "
            f"{metrics.get('holdout_accuracy', float('nan')):.3f} agreement "
            f"{metrics.get('agreement', float('nan')):.3f} ({int(metrics['transfer_synthetic_kept'])} of "
            f"{int(metrics['transfer_synthetic'])} synthetic inputs kept)"
        )
    for domain, why in report.skipped.items():
        print(f"{domain}: skipped ({why})")
    target = migration_settings(settings, args.to_model)
    print(f"plan: {report.plan}")
    print(
        "before the cutover, feed the new base's memory beside the old one: driftserve memory-writer "
        f"--model-path {target.model_path} --consumer-group-prefix {target.consumer_group_prefix}"
    )
    return 0


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    from ops.replay.cli import add_arguments

    add_arguments(parser)


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from ops.replay.cli import run

    return run(args, settings)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        choices=["feedback", "serve", "retrieval", "memory", "overhead", "encoder", "transfer", "nfr"],
        help="which benchmark",
    )
    parser.add_argument("--streams", nargs="*", default=[], help="labelled streams to mix (retrieval)")
    parser.add_argument("--out", default="bench-results", help="directory for JSON, markdown and PNG")
    parser.add_argument("--url", help="a running driftserve (feedback); default: start the embedded stack")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers with --url")
    parser.add_argument("--rate", type=float, default=200.0, help="feedback events/s (feedback)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of feedback (feedback)")
    parser.add_argument("--sample-every", type=int, default=50, help="probe every Nth event (feedback)")
    parser.add_argument("--ingest-events", type=int, default=2000, help="burst size (feedback)")
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="memory sizes (memory)")
    parser.add_argument("--kinds", default="exact,ann,ivf", help="memory kinds to compare (memory, overhead)")
    parser.add_argument("--entries", type=int, default=100_000, help="memory entries (overhead)")
    parser.add_argument("--batches", default="1,4,16", help="batch sizes (overhead)")
    parser.add_argument("--no-adapters", action="store_true", help="memory-served domains only (overhead)")
    parser.add_argument("--start", type=int, default=0, help="events skipped before the history (transfer)")
    parser.add_argument("--history", type=int, default=8000, help="events before the migration (transfer)")
    parser.add_argument("--evaluate", type=int, default=4000, help="events replayed after it (transfer)")
    parser.add_argument("--buffer-capacity", type=int, default=2000, help="replay buffer size (transfer)")
    parser.add_argument("--window", type=int, default=500, help="events per reported window (transfer)")
    parser.add_argument("--to-model", default="all-mpnet-base-v2", help="new base, '' for none (transfer)")
    parser.add_argument(
        "--same-arch-model", default="sre-embedding-model", help="same-architecture base, '' for none"
    )
    parser.add_argument("--teacher-steps", type=int, default=400, help="old adapter training (transfer)")
    parser.add_argument("--transfer-steps", type=int, default=300, help="distillation steps (transfer)")
    parser.add_argument("--synthetic", type=int, default=3, help="perturbed texts per example (transfer)")
    parser.add_argument("--teacher-artifact", help="reuse this old-base artifact as the teacher (transfer)")
    parser.add_argument(
        "--student-artifact",
        help="reuse this transferred new-base artifact, fitted metrics included (transfer)",
    )
    parser.add_argument("--no-retrain", action="store_true", help="skip the retrain reference (transfer)")
    parser.add_argument(
        "--no-online-mix",
        action="store_true",
        help="serve the fitted head/memory weight as is, no online calibration (transfer ablation)",
    )
    parser.add_argument("--v1-events", type=int, default=500, help="window 1, trains v1 (nfr)")
    parser.add_argument("--update-events", type=int, default=500, help="window 2, trains the update (nfr)")
    parser.add_argument("--eval-events", type=int, default=1000, help="later events evaluated (nfr)")
    parser.add_argument("--gap", type=int, default=0, help="events skipped before the evaluated ones (nfr)")
    parser.add_argument("--v1-steps", type=int, default=150, help="v1 training steps (nfr)")
    parser.add_argument("--update-steps", type=int, default=150, help="steps of each update (nfr)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every model (nfr)")
    parser.add_argument("--reuse", help="an earlier nfr.json: reuse its v1 and naive artifacts (nfr)")
    parser.add_argument(
        "--distill-mask", choices=["old_right", "flips", "focal"], help="driftserve update's (nfr)"
    )
    parser.add_argument(
        "--interpolation-grid", help="driftserve update's, comma-separated; '' for none (nfr)"
    )
    parser.add_argument(
        "--guard", action="store_true", help="driftserve update guarded by v1 (nfr; as --learner-guard)"
    )
    parser.add_argument("--guard-margin", type=float, help="driftserve update's guard margin (nfr)")
    parser.add_argument(
        "--fit-guard-margin", action="store_true", help="fit the guard margin on the holdout (nfr)"
    )
    parser.add_argument("--no-curve", action="store_true", help="skip the interpolation curve (nfr)")
    parser.add_argument("--distill-weight", type=float, help="driftserve update's distillation weight (nfr)")
    parser.add_argument("--replay-share", type=float, help="driftserve update's replay share (nfr)")


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    out = Path(args.out)
    if args.name == "feedback":
        from ops.bench import feedback

        result = feedback.run(
            settings,
            out,
            url=args.url,
            bootstrap=args.bootstrap,
            rate=args.rate,
            duration=args.duration,
            sample_every=args.sample_every,
            ingest_events=args.ingest_events,
        )
        print((out / "feedback.md").read_text())
        return 0 if result["fix"]["fix_seconds"].get("n") else 1
    if args.name == "serve":
        from ops.bench import serve

        result = serve.run(settings, out)
        print((out / "serve.md").read_text())
        return 0 if result["capacity_rps"]["naive"] else 1
    if args.name == "retrieval":
        from ops.bench import retrieval

        if len(args.streams) < 2:
            print("driftserve: bench retrieval needs --streams with at least two streams", file=sys.stderr)
            return 2
        retrieval.run([Path(p) for p in args.streams], out)
        print((out / "retrieval.md").read_text())
        return 0
    if args.name == "memory":
        from ops.bench import memory

        memory.run(out, [int(x) for x in args.sizes.split(",")], kinds=args.kinds.split(","))
        print((out / "memory.md").read_text())
        return 0
    if args.name == "overhead":
        from ops.bench import overhead

        overhead.run(
            out,
            entries=args.entries,
            kinds=tuple(args.kinds.split(",")),
            batch_sizes=tuple(int(b) for b in args.batches.split(",")),
            runtime=settings.runtime,
            model_path=settings.model_path,
            adapters=not args.no_adapters,
        )
        print((out / "overhead.md").read_text())
        return 0
    if args.name == "transfer":
        return _bench_transfer(args, settings, out)
    if args.name == "nfr":
        return _bench_nfr(args, settings, out)
    from ops.bench import encoder

    encoder.run(out)
    return 0


def _bench_transfer(args: argparse.Namespace, settings: Settings, out) -> int:
    from dataclasses import replace
    from pathlib import Path

    from learners.trainer import TrainConfig
    from learners.transfer import TransferConfig
    from ops.bench import transfer

    if len(args.streams) != 1:
        print("driftserve: bench transfer needs --streams with exactly one stream", file=sys.stderr)
        return 2
    base = TransferConfig()
    cfg = transfer.TransferBench(
        start=args.start,
        history=args.history,
        evaluate=args.evaluate,
        buffer_capacity=args.buffer_capacity,
        window=args.window,
        device=settings.device,
        max_length=settings.max_length,
        old_model=settings.model_path,
        new_model=args.to_model or None,
        same_arch_model=args.same_arch_model or None,
        retrain_reference=not args.no_retrain,
        online_mix=not args.no_online_mix,
        teacher_artifact=args.teacher_artifact,
        student_artifact=args.student_artifact,
        holdout_frac=settings.learner_holdout_frac,
        # The teacher as docs/migration.md measured it: LoRA in every layer, 128 tokens.
        teacher=TrainConfig(
            epochs=3, max_steps=args.teacher_steps, batch_size=16, lora_layers=None, max_length=None
        ),
        transfer=replace(
            base,
            synthetic_per_example=args.synthetic,
            train=replace(base.train, max_steps=args.transfer_steps),
        ),
        comp=settings.compensation(),
    )
    transfer.run(Path(args.streams[0]), out, cfg)
    print((out / "transfer.md").read_text())
    return 0


def _grid(text: str | None) -> tuple[float, ...] | None:
    """A comma-separated grid ('' for an empty one), or None when the option is absent."""
    if text is None:
        return None
    return tuple(float(x) for x in text.split(",") if x.strip())


def _bench_nfr(args: argparse.Namespace, settings: Settings, out) -> int:
    from dataclasses import replace
    from pathlib import Path

    from ops.bench import nfr

    if len(args.streams) != 1:
        print("driftserve: bench nfr needs --streams with exactly one stream", file=sys.stderr)
        return 2
    learner = settings.training()
    # Both the naive and the driftserve update run exactly --update-steps steps (epochs never bind).
    cfg = nfr.NfrBench(
        start=args.start,
        v1_events=args.v1_events,
        update_events=args.update_events,
        gap=args.gap,
        eval_events=args.eval_events,
        holdout_frac=settings.learner_holdout_frac,
        device=settings.device,
        max_length=settings.max_length,
        model_path=settings.model_path,
        reuse=args.reuse,
        curve=not args.no_curve,
        v1=replace(learner, epochs=10_000, max_steps=args.v1_steps, seed=args.seed),
        update=replace(
            learner,
            epochs=10_000,
            max_steps=args.update_steps,
            seed=args.seed,
            **{
                k: v
                for k, v in (
                    ("distill_mask", args.distill_mask),
                    ("distill_weight", args.distill_weight),
                    ("replay_share", args.replay_share),
                    ("guard", True if args.guard else None),
                    ("interpolation_grid", _grid(args.interpolation_grid)),
                )
                if v is not None
            },
            **(
                {"guard_margin": None}
                if args.fit_guard_margin
                else {}
                if args.guard_margin is None
                else {"guard_margin": args.guard_margin}
            ),
        ),
        comp=settings.compensation(),
    )
    nfr.run(Path(args.streams[0]), out, cfg)
    print((out / "nfr.md").read_text())
    return 0


COMMANDS = {
    "up": (
        _cmd_up,
        "start broker, Redis, Ray Serve, memory writer and learner on 127.0.0.1; serve until Ctrl-C",
    ),
    "demo": (_cmd_up, "start the embedded stack, show a correction and an adapter hot-swap, then stop"),
    "memory-writer": (_cmd_memory_writer, "consume feedback into the Redis error memory"),
    "learner": (_cmd_learner, "consume feedback, train and publish adapters"),
    "rollout-controller": (
        _cmd_rollout_controller,
        "gate candidates, run shadow and canary, promote or roll back",
    ),
    "registry": (_cmd_registry, "list model versions and their states, or show one with lineage and audit"),
    "rollout": (_cmd_rollout, "rollout status, or promote / rollback / pause / resume a domain's rollout"),
    "memory": (_cmd_memory, "error-memory administration: rebuild from the Kafka log"),
    "bench": (_cmd_bench, "benchmarks: feedback-to-fix, serving vs naive Serve, memory lookup, runtimes"),
    "migrate-base": (
        _cmd_migrate,
        "move every domain's adapter to a new base model (Trans-LoRA) and re-key the error memory",
    ),
    "replay": (_cmd_replay, "replay a labelled stream against driftserve and report prequential quality"),
}
EXTRA_ARGUMENTS = {
    "registry": _registry_arguments,
    "rollout": _rollout_arguments,
    "memory": _memory_arguments,
    "replay": _replay_arguments,
    "bench": _bench_arguments,
    "migrate-base": _migrate_arguments,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in EXTRA_ARGUMENTS:
            EXTRA_ARGUMENTS[name](p)
        _add_settings_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    forced = {}
    if args.command == "demo":
        # The demo ships 45 labelled examples; train the first adapter after 24 of them.
        forced = {
            "learner_min_examples": args.setting_learner_min_examples or 24,
            # A short rollout, so the demo shows every stage within a minute; production uses the defaults.
            "shadow_seconds": args.setting_shadow_seconds or 3,
            "canary_weight": args.setting_canary_weight or 0.5,
            "canary_interval_s": args.setting_canary_interval_s or 3,
            "canary_passes": args.setting_canary_passes or 2,
            "canary_min_requests": args.setting_canary_min_requests or 2,
            # Its first adapter is held out on about 5 tickets: no gain over the memory is measurable there.
            "gate_first_min_gain": args.setting_gate_first_min_gain or 0.0,
        }
    try:
        settings = _settings(args, **forced)
    except ValidationError as exc:
        print(f"driftserve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from ops.wiring import configure_logging

    configure_logging(settings)
    fn, _help = COMMANDS[args.command]
    started = time.monotonic()
    code = fn(args, settings)
    log.debug("%s finished in %.1fs", args.command, time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
