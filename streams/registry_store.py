"""The registry's shared state in Redis: version records, the active pointers, in-flight rollouts, the
append-only audit log, replica heartbeats and the online observations canaries are judged on.

Every state change is one Redis transaction (``WATCH`` on what it read) that also appends its audit
record, so the log and the state never disagree, whoever made the change: the rollout controller, the
CLI or the admin HTTP API all call these same methods. The audit stream is never trimmed; the rollout
controller forwards it to the Kafka rollout topic.

Keys (``ns`` = the Redis namespace):

- ``ns:registry:active``   hash domain -> promoted version (what replicas serve by default)
- ``ns:registry:versions`` hash "domain/version" -> :class:`VersionRecord` JSON
- ``ns:registry:rollout``  hash domain -> :class:`RolloutState` JSON (shadow or canary in flight)
- ``ns:registry:audit``    stream of :class:`~streams.schemas.RolloutEvent` JSON
- ``ns:registry:replicas`` hash replica id -> heartbeat JSON (what it serves, when it last synced)
- ``ns:rollout:obs``       capped stream of online observations (canary and shadow answers)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from streams.errors import StoreUnavailable
from streams.redis_store import RedisConfig, _guard
from streams.schemas import RolloutEvent

State = Literal[
    "candidate",
    "rejected",
    "shadow",
    "canary",
    "promoted",
    "retired",
    "rolled_back",
    "superseded",
    "withdrawn",
]
Stage = Literal["shadow", "canary"]
LIVE_STATES = frozenset({"shadow", "canary"})
PROMOTABLE = frozenset({"candidate", "shadow", "canary"})
OBS_MAXLEN = 200_000


class RegistryConflict(Exception):
    """The requested transition does not apply to the current state (e.g. promote with no rollout)."""


class StaleEvaluation(RegistryConflict):
    """A candidate's evaluation compared it with a version that is no longer served."""


class VersionRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    domain: str
    version: str
    state: State
    parent: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    unlearning: bool = False
    # The version its evaluation compared it with ("" the memory alone); None: not recorded, its parent.
    evaluated_against: str | None = None
    reason: str = ""
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)


def baseline_of(record: VersionRecord) -> str:
    """The version a candidate's evaluation compared it with ("": the memory alone, no adapter)."""
    if record.evaluated_against is not None:
        return record.evaluated_against
    return record.parent or ""


class RolloutState(BaseModel):
    """A candidate in flight for one domain. ``weight``: the canary's share of the domain's traffic."""

    model_config = ConfigDict(extra="ignore")

    domain: str
    version: str
    stage: Stage
    weight: float = 0.0
    shadow_share: float = 0.0
    paused: bool = False
    passes: int = 0
    failures: int = 0
    started_at: float = Field(default_factory=time.time)
    stage_started_at: float = Field(default_factory=time.time)
    last_analysis_at: float = Field(default_factory=time.time)


class RegistryStore:
    def __init__(self, client: redis.Redis, cfg: RedisConfig) -> None:
        self._r = client
        ns = cfg.namespace
        self.active_key = f"{ns}:registry:active"
        self.versions_key = f"{ns}:registry:versions"
        self.rollout_key = f"{ns}:registry:rollout"
        self.audit_key = f"{ns}:registry:audit"
        self.replicas_key = f"{ns}:registry:replicas"
        self.obs_key = f"{ns}:rollout:obs"
        self.candidates_key = f"{ns}:registry:candidates"  # "domain/version" of records in state candidate

    # -- reads ------------------------------------------------------------------------------------------
    @_guard("registry read failed")
    def active(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self._r.hgetall(self.active_key).items()}

    @_guard("registry read failed")
    def rollouts(self) -> dict[str, RolloutState]:
        raw = self._r.hgetall(self.rollout_key)
        return {k.decode(): RolloutState.model_validate_json(v) for k, v in raw.items()}

    @_guard("registry read failed")
    def serving_view(self) -> tuple[dict[str, str], dict[str, RolloutState]]:
        """Active pointers and rollouts read in one round trip (what a replica syncs to)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self.active_key)
        pipe.hgetall(self.rollout_key)
        active, rollout = pipe.execute()
        return (
            {k.decode(): v.decode() for k, v in active.items()},
            {k.decode(): RolloutState.model_validate_json(v) for k, v in rollout.items()},
        )

    @_guard("registry read failed")
    def get(self, domain: str, version: str) -> VersionRecord | None:
        raw = self._r.hget(self.versions_key, f"{domain}/{version}")
        return None if raw is None else VersionRecord.model_validate_json(raw)

    @_guard("registry read failed")
    def versions(self, domain: str | None = None) -> list[VersionRecord]:
        records = [VersionRecord.model_validate_json(v) for v in self._r.hvals(self.versions_key)]
        if domain is not None:
            records = [r for r in records if r.domain == domain]
        return sorted(records, key=lambda r: (r.domain, r.created_at))

    @_guard("registry read failed")
    def candidates(self) -> list[VersionRecord]:
        """Records waiting for the controller, oldest first (an index, so a long history costs nothing)."""
        keys = sorted(k.decode() for k in self._r.smembers(self.candidates_key))
        if not keys:
            return []
        raw = self._r.hmget(self.versions_key, keys)
        records = [VersionRecord.model_validate_json(v) for v in raw if v is not None]
        return sorted((r for r in records if r.state == "candidate"), key=lambda r: r.created_at)

    def lineage(self, domain: str, version: str) -> list[VersionRecord]:
        """The version and its ancestors, newest first (stops at the first unknown parent)."""
        chain, seen = [], set()
        current: str | None = version
        while current is not None and current not in seen:
            seen.add(current)
            record = self.get(domain, current)
            if record is None:
                break
            chain.append(record)
            current = record.parent
        return chain

    @_guard("registry read failed")
    def audit(self, domain: str | None = None, limit: int = 100) -> list[RolloutEvent]:
        """The newest ``limit`` decisions (of one domain, if given), oldest first."""
        out: list[RolloutEvent] = []
        last = "+"
        while len(out) < limit:
            batch = self._r.xrevrange(self.audit_key, max=last, min="-", count=500)
            if not batch:
                break
            for _entry_id, fields in batch:
                event = RolloutEvent.model_validate_json(fields[b"event"])
                if domain is None or event.domain == domain:
                    out.append(event)
                    if len(out) >= limit:
                        break
            last = "(" + batch[-1][0].decode()
        return out[::-1]

    @_guard("registry read failed")
    def audit_since(self, cursor: str, count: int = 500) -> list[tuple[str, RolloutEvent]]:
        batch = self._r.xrange(self.audit_key, min=f"({cursor}" if cursor != "0" else "-", count=count)
        return [(i.decode(), RolloutEvent.model_validate_json(f[b"event"])) for i, f in batch]

    # -- transitions (each one transaction + its audit record) ------------------------------------------
    def _transact(
        self, domain: str, change: Callable[[_Tx], RolloutEvent], audit: bool = True
    ) -> RolloutEvent:
        """Run ``change`` under WATCH, then apply its writes and (``audit``) its record in one transaction."""
        for _ in range(50):
            try:
                with self._r.pipeline(transaction=True) as pipe:
                    pipe.watch(self.rollout_key, self.active_key, self.versions_key)
                    tx = _Tx(self, pipe, domain)
                    event = change(tx)
                    pipe.multi()
                    for op in tx.ops:
                        op(pipe)
                    if audit:
                        pipe.xadd(self.audit_key, {"event": event.model_dump_json()})
                    pipe.execute()
                    return event
            except redis.WatchError:
                continue
            except redis.RedisError as exc:
                raise StoreUnavailable(f"registry write failed: {exc}") from exc
        raise StoreUnavailable("registry write kept conflicting")

    def submit_candidate(
        self,
        domain: str,
        version: str,
        *,
        parent: str | None,
        metrics: dict[str, float],
        actor: str = "learner",
        reason: str = "",
        unlearning: bool = False,
        evaluated_against: str | None = None,
    ) -> RolloutEvent:
        """``evaluated_against``: the served version its evaluation compared it with ("" the memory
        alone), if that is not its parent (the served version changed while it trained)."""

        def change(tx: _Tx) -> RolloutEvent:
            tx.register(
                version,
                "candidate",
                parent,
                metrics,
                reason,
                unlearning=unlearning,
                evaluated_against=evaluated_against,
            )
            return tx.event("candidate", version, actor, reason, metrics, parent)

        return self._transact(domain, change)

    def reject(
        self, domain: str, version: str, *, actor: str, reason: str, metrics: dict[str, float]
    ) -> RolloutEvent:
        def change(tx: _Tx) -> RolloutEvent:
            tx.require_candidate(version, "rejected")
            tx.set_state(version, "rejected", reason, metrics)
            return tx.event("rejected", version, actor, reason, metrics)

        return self._transact(domain, change)

    def supersede(self, domain: str, version: str, *, by: str, actor: str) -> RolloutEvent:
        def change(tx: _Tx) -> RolloutEvent:
            reason = f"superseded by {by} before its rollout started"
            tx.require_candidate(version, "superseded")
            tx.set_state(version, "superseded", reason)
            return tx.event("superseded", version, actor, reason, {})

        return self._transact(domain, change)

    def start(
        self,
        domain: str,
        version: str,
        stage: Stage,
        *,
        weight: float = 0.0,
        shadow_share: float = 0.0,
        actor: str,
        reason: str,
        metrics: dict[str, float] | None = None,
    ) -> RolloutEvent:
        """Begin (or move to) the shadow or canary stage for a candidate of ``domain``."""

        def change(tx: _Tx) -> RolloutEvent:
            current = tx.rollout()
            if current is not None:
                tx.require_running(current, version)  # a stage move; a paused rollout stays as it is
            record = tx.record(version)
            if record is None or record.state not in {"candidate", "shadow"}:
                raise RegistryConflict(f"{domain}/{version} is not a candidate ({record and record.state})")
            if current is None:  # a rollout begins: its evaluation must be against what is served
                against, served = baseline_of(record), tx.active() or ""
                if against != served:  # checked in this transaction: a promotion just before counts
                    raise StaleEvaluation(
                        f"compared with {against or 'the memory alone'}, {served or 'the memory alone'} "
                        "is served now"
                    )
            now = time.time()
            state = RolloutState(
                domain=domain,
                version=version,
                stage=stage,
                weight=weight if stage == "canary" else 0.0,
                shadow_share=shadow_share,
                started_at=current.started_at if current else now,
                stage_started_at=now,
                last_analysis_at=now,
            )
            tx.put_rollout(state)
            tx.set_state(version, stage, reason)
            return tx.event(stage, version, actor, reason, {**(metrics or {}), "weight": state.weight})

        return self._transact(domain, change)

    def record_analysis(
        self,
        domain: str,
        version: str,
        *,
        passed: bool | None,
        reason: str,
        metrics: dict[str, float],
        actor: str = "rollout-controller",
        audit: bool = True,
    ) -> RolloutEvent:
        """Count one analysis interval's verdict (None: inconclusive) and audit it with its metrics
        (``audit`` False: an idle domain's inconclusive intervals only move the clock)."""

        def change(tx: _Tx) -> RolloutEvent:
            current = tx.require_running(tx.rollout(), version)
            update: dict[str, Any] = {"last_analysis_at": time.time()}
            if passed is True:
                update["passes"] = current.passes + 1
            elif passed is False:
                update["failures"] = current.failures + 1
            tx.put_rollout(current.model_copy(update=update))
            verdict = {True: "pass", False: "fail", None: "inconclusive"}[passed]
            return tx.event(
                "analysis",
                version,
                actor,
                f"{current.stage} {verdict}: {reason}",
                {
                    **metrics,
                    "passes": update.get("passes", current.passes),
                    "failures": update.get("failures", current.failures),
                },
            )

        return self._transact(domain, change, audit=audit)

    def promote(
        self,
        domain: str,
        version: str,
        *,
        actor: str,
        reason: str,
        metrics: dict[str, float] | None = None,
        allow: frozenset[str] = PROMOTABLE,
        from_rollout: bool = False,
    ) -> RolloutEvent:
        """Make ``version`` what the domain serves: from a rollout, or directly (unlearning, operators).
        ``allow``: the states it may be promoted from (operators may also revert to earlier versions).
        ``from_rollout``: the controller's verdict on the version's running rollout, refused if that
        rollout ended or was paused since the controller read it."""

        def change(tx: _Tx) -> RolloutEvent:
            if from_rollout:
                tx.require_running(tx.rollout(), version)
            record = tx.record(version)
            if record is None:
                raise RegistryConflict(f"{domain}/{version} is not registered")
            if record.state not in allow:
                raise RegistryConflict(f"{domain}/{version} is {record.state}; it cannot be promoted")
            return tx.activate(version, actor, reason, metrics)

        return self._transact(domain, change)

    def install(
        self,
        domain: str,
        version: str,
        *,
        parent: str | None,
        actor: str,
        reason: str,
        metrics: dict[str, float] | None = None,
    ) -> RolloutEvent:
        """Register ``version`` and make it what the domain serves, in one transaction: an operator's
        starting version or a restore. It is never a waiting candidate, so the rollout controller cannot
        gate it (and reject it for lacking an evaluation) between its registration and its promotion."""

        def change(tx: _Tx) -> RolloutEvent:
            tx.register(version, "promoted", parent, metrics or {}, reason)
            return tx.activate(version, actor, reason, metrics)

        return self._transact(domain, change)

    def rollback(
        self,
        domain: str,
        *,
        actor: str,
        reason: str,
        metrics: dict[str, float] | None = None,
        version: str | None = None,
    ) -> RolloutEvent:
        """End the in-flight rollout: all of the domain's traffic goes back to the promoted version.
        ``version``: the controller's verdict on that version's rollout, refused if another version rolls
        out now or the rollout was paused since the controller read it. Without it (an operator, or
        unlearning) whatever is in flight ends, paused or not."""

        def change(tx: _Tx) -> RolloutEvent:
            current = tx.rollout()
            if current is None:
                raise RegistryConflict(f"{domain} has no rollout in flight")
            if version is not None:
                tx.require_running(current, version)
            tx.ops.append(lambda p: p.hdel(self.rollout_key, domain))
            tx.set_state(current.version, "rolled_back", reason, metrics)
            return tx.event("rolled_back", current.version, actor, reason, metrics or {}, tx.active())

        return self._transact(domain, change)

    def set_paused(self, domain: str, paused: bool, *, actor: str, reason: str) -> RolloutEvent:
        """A paused rollout keeps its traffic split but neither advances nor rolls back on its own."""

        def change(tx: _Tx) -> RolloutEvent:
            current = tx.rollout()
            if current is None:
                raise RegistryConflict(f"{domain} has no rollout in flight")
            tx.put_rollout(current.model_copy(update={"paused": paused, "last_analysis_at": time.time()}))
            return tx.event("paused" if paused else "resumed", current.version, actor, reason, {})

        return self._transact(domain, change)

    def withdraw(self, domain: str, *, actor: str, reason: str) -> RolloutEvent:
        """Stop serving the domain's adapter at all (e.g. it saw forgotten data and too little is left)."""

        def change(tx: _Tx) -> RolloutEvent:
            previous = tx.active()
            if previous is None:
                raise RegistryConflict(f"{domain} serves no adapter")
            tx.ops.append(lambda p: p.hdel(self.active_key, domain))
            if tx.record(previous) is not None:
                tx.set_state(previous, "withdrawn", reason)
            return tx.event("withdrawn", previous, actor, reason, {})

        return self._transact(domain, change)

    @_guard("registry read failed")
    def forward_cursor(self) -> str:
        raw = self._r.get(self.audit_key + ":forwarded")
        return raw.decode() if raw else "0"

    @_guard("registry write failed")
    def set_forward_cursor(self, cursor: str) -> None:
        self._r.set(self.audit_key + ":forwarded", cursor)

    # -- replicas and online observations ---------------------------------------------------------------
    @_guard("heartbeat failed")
    def heartbeat(self, replica: str, active: dict[str, str], rollout: dict[str, str]) -> None:
        payload = json.dumps({"ts": time.time(), "active": active, "rollout": rollout})
        self._r.hset(self.replicas_key, replica, payload)

    @_guard("registry read failed")
    def replicas(self, max_age_s: float = 30.0) -> dict[str, dict[str, Any]]:
        now = time.time()
        out = {}
        for k, v in self._r.hgetall(self.replicas_key).items():
            beat = json.loads(v)
            if now - beat["ts"] <= max_age_s:
                out[k.decode()] = beat
        return out

    @_guard("heartbeat failed")
    def forget_replica(self, replica: str) -> None:
        self._r.hdel(self.replicas_key, replica)

    @_guard("observation write failed")
    def observe(self, observations: list[dict[str, Any]]) -> None:
        if not observations:
            return
        pipe = self._r.pipeline(transaction=False)
        for obs in observations:
            pipe.xadd(self.obs_key, {"o": json.dumps(obs)}, maxlen=OBS_MAXLEN, approximate=True)
        pipe.execute()

    @_guard("observation read failed")
    def observations_since(self, cursor: str, count: int = 5000) -> tuple[str, list[dict[str, Any]]]:
        batch = self._r.xrange(self.obs_key, min=f"({cursor}" if cursor != "0" else "-", count=count)
        if not batch:
            return cursor, []
        return batch[-1][0].decode(), [json.loads(f[b"o"]) for _, f in batch]

    @_guard("observation read failed")
    def observations_tail(self) -> str:
        """The id of the newest observation (start reading after it), "0" when there is none."""
        last = self._r.xrevrange(self.obs_key, count=1)
        return last[0][0].decode() if last else "0"


class _Tx:
    """Reads (under WATCH) and queued writes of one registry transaction."""

    def __init__(self, store: RegistryStore, pipe: Any, domain: str) -> None:
        self.store, self.pipe, self.domain = store, pipe, domain
        self.ops: list[Callable[[Any], Any]] = []
        self._records: dict[str, VersionRecord] = {}

    def record(self, version: str) -> VersionRecord | None:
        if version not in self._records:
            raw = self.pipe.hget(self.store.versions_key, f"{self.domain}/{version}")
            if raw is None:
                return None
            self._records[version] = VersionRecord.model_validate_json(raw)
        return self._records[version]

    def active(self) -> str | None:
        raw = self.pipe.hget(self.store.active_key, self.domain)
        return None if raw is None else raw.decode()

    def rollout(self) -> RolloutState | None:
        raw = self.pipe.hget(self.store.rollout_key, self.domain)
        return None if raw is None else RolloutState.model_validate_json(raw)

    def put(self, record: VersionRecord) -> None:
        self._records[record.version] = record
        key, payload = f"{record.domain}/{record.version}", record.model_dump_json()
        self.ops.append(lambda p: p.hset(self.store.versions_key, key, payload))
        if record.state == "candidate":
            self.ops.append(lambda p: p.sadd(self.store.candidates_key, key))
        else:
            self.ops.append(lambda p: p.srem(self.store.candidates_key, key))

    def register(
        self,
        version: str,
        state: State,
        parent: str | None,
        metrics: dict[str, float],
        reason: str,
        *,
        unlearning: bool = False,
        evaluated_against: str | None = None,
    ) -> None:
        """Write a version never registered before (a version name is never reused)."""
        if self.record(version) is not None:
            raise RegistryConflict(f"{self.domain}/{version} is already registered")
        self.put(
            VersionRecord(
                domain=self.domain,
                version=version,
                state=state,
                parent=parent,
                metrics=metrics,
                unlearning=unlearning,
                evaluated_against=evaluated_against,
                reason=reason,
            )
        )

    def require_candidate(self, version: str, to: str) -> None:
        """Decisions taken on a waiting candidate (reject, supersede) apply only while it still waits: the
        controller reads the candidates, then verifies and gates them, and an operator or another
        transition may have moved the version meanwhile (a promoted version must never turn rejected)."""
        record = self.record(version)
        if record is None:
            raise RegistryConflict(f"{self.domain}/{version} is not registered")
        if record.state != "candidate":
            raise RegistryConflict(
                f"{self.domain}/{version} is {record.state}, no longer a candidate; not marked {to}"
            )

    def require_running(self, current: RolloutState | None, version: str) -> RolloutState:
        """The controller's verdicts (an analysis, a stage move, promotion or rollback after it) are
        about the rollout it read a moment before; they apply only if that rollout still runs unpaused.
        An operator's pause landing in between must hold: a paused rollout neither advances nor rolls
        back on its own."""
        if current is None or current.version != version:
            running = "nothing" if current is None else current.version
            raise RegistryConflict(f"{self.domain}/{version} is not rolling out ({running} is)")
        if current.paused:
            raise RegistryConflict(f"{self.domain}/{version} was paused; the controller's verdict waits")
        return current

    def activate(
        self, version: str, actor: str, reason: str, metrics: dict[str, float] | None
    ) -> RolloutEvent:
        """Make ``version`` the domain's active version: the one it replaces retires and a rollout of
        another version is superseded."""
        domain, store = self.domain, self.store
        previous = self.active()
        if previous is not None and previous != version and self.record(previous) is not None:
            self.set_state(previous, "retired", f"replaced by {version}")
        current = self.rollout()
        if current is not None:
            if current.version != version:
                self.set_state(current.version, "superseded", f"{version} promoted over it")
            self.ops.append(lambda p: p.hdel(store.rollout_key, domain))
        self.ops.append(lambda p: p.hset(store.active_key, domain, version))
        self.set_state(version, "promoted", reason, metrics)
        return self.event("promoted", version, actor, reason, metrics or {}, previous)

    def put_rollout(self, state: RolloutState) -> None:
        payload = state.model_dump_json()
        self.ops.append(lambda p: p.hset(self.store.rollout_key, state.domain, payload))

    def set_state(
        self, version: str, state: State, reason: str, metrics: dict[str, float] | None = None
    ) -> None:
        record = self.record(version)
        if record is None:
            raise RegistryConflict(f"{self.domain}/{version} is not registered")
        update: dict[str, Any] = {"state": state, "reason": reason, "updated_at": time.time()}
        if metrics:
            update["metrics"] = {**record.metrics, **metrics}
        self.put(record.model_copy(update=update))

    def event(
        self,
        kind: str,
        version: str,
        actor: str,
        reason: str,
        metrics: dict[str, float],
        parent: str | None = None,
    ) -> RolloutEvent:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        return RolloutEvent(
            type=kind,
            domain=self.domain,
            version=version,
            parent=parent,
            actor=actor,
            reason=reason,
            metrics=clean,
        )
