"""Redis-backed stores: the error-memory log, idempotency keys, forget records, the request-embedding
cache. The registry's state lives in :mod:`streams.registry_store`.

The error memory of one base model (its fingerprint) is an append-only Redis Stream per *generation*;
a rebuild writes a new generation from the Kafka log and then flips the generation pointer, so serving
keeps reading the old one until the new one is complete. Writers append through Lua scripts that check
and set the event's idempotency key in the same step, so a redelivered Kafka message is applied at most
once, and a forgotten event or subject is never re-added by a redelivery or a rebuild.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis
from redis.exceptions import RedisError

from streams.errors import StoreUnavailable

# KEYS: applied, stream, forgotten_ids, forgotten_subjects, dup_counter, subject_index (or "")
# ARGV: id, domain, label, emb, ts, version, subject, mix (JSON or "")
_ADD_ONCE = """
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 2 end
if ARGV[7] ~= '' and redis.call('SISMEMBER', KEYS[4], ARGV[7]) == 1 then return 2 end
if redis.call('SET', KEYS[1], 'added', 'NX') then
  local fields = {'op', 'add', 'id', ARGV[1], 'domain', ARGV[2], 'label', ARGV[3],
                  'emb', ARGV[4], 'ts', ARGV[5], 'version', ARGV[6]}
  if ARGV[8] ~= '' then
    table.insert(fields, 'mix')
    table.insert(fields, ARGV[8])
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  if ARGV[7] ~= '' then redis.call('SADD', KEYS[6], ARGV[1]) end
  return 1
end
redis.call('INCR', KEYS[5])
return 0
"""

# KEYS: applied, stream, forgotten_ids ; ARGV: id
_FORGET_ID = """
redis.call('SADD', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[1]) == 'added' then
  redis.call('SET', KEYS[1], 'deleted')
  redis.call('XADD', KEYS[2], '*', 'op', 'del', 'id', ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:16379/0"
    namespace: str = "ds"
    socket_timeout_s: float = 2.0
    ssl_ca_certs: str | None = None
    request_ttl_s: int = 900


@dataclass(frozen=True)
class MemoryEntry:
    event_id: str
    domain: str
    label: str
    embedding: np.ndarray  # float32, L2-normalised
    ts: float
    model_version: str
    subject_id: str | None = None
    # The answer this label judges, when the feedback named a request serving kept a record of
    # (``serving.mixing.Outcome``): (adapter version or "", p_head(label) and p_memory(label) or None,
    # the compensation's unscaled lambda, p_before(label), p_neighbours(label)).
    mix: tuple[str, float | None, float | None, float, float, float] | None = None


@dataclass(frozen=True)
class Deletion:
    event_id: str


def connect(cfg: RedisConfig) -> redis.Redis:
    kwargs = {}
    if cfg.ssl_ca_certs:
        kwargs["ssl_ca_certs"] = cfg.ssl_ca_certs
    return redis.Redis.from_url(
        cfg.url,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.socket_timeout_s,
        health_check_interval=10,
        **kwargs,
    )


def _guard(what: str):
    def wrap(fn):
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RedisError as exc:
                raise StoreUnavailable(f"{what}: {exc}") from exc

        inner.__name__ = fn.__name__
        inner.__doc__ = fn.__doc__
        return inner

    return wrap


class MemoryLog:
    """The error memory for one base model (``fingerprint``) and generation: append once, forget, tail."""

    def __init__(
        self, client: redis.Redis, cfg: RedisConfig, fingerprint: str, generation: int | None = None
    ) -> None:
        self._r = client
        self._cfg = cfg
        self._fingerprint = fingerprint
        self._ns = cfg.namespace
        self._base = f"{cfg.namespace}:mem:{fingerprint[:16]}"
        self.generation_key = f"{self._base}:generation"
        self.generation = self.current_generation() if generation is None else generation
        self.stream_key = f"{self._base}:g{self.generation}:log"
        self.forgotten_ids_key = f"{cfg.namespace}:forgotten:ids"
        self.forgotten_subjects_key = f"{cfg.namespace}:forgotten:subjects"
        self.duplicates_key = f"{self._base}:g{self.generation}:duplicates"
        self._add_once = client.register_script(_ADD_ONCE)
        self._forget_id = client.register_script(_FORGET_ID)

    @_guard("error memory generation read failed")
    def current_generation(self) -> int:
        raw = self._r.get(self.generation_key)
        return int(raw) if raw is not None else 0

    def at(self, generation: int) -> MemoryLog:
        return MemoryLog(self._r, self._cfg, self._fingerprint, generation)

    def follow(self) -> MemoryLog:
        """This log, or the current generation's if a rebuild has switched it."""
        generation = self.current_generation()
        return self if generation == self.generation else self.at(generation)

    @_guard("error memory generation switch failed")
    def activate(self) -> None:
        """Point readers at this generation (after a rebuild has written it completely)."""
        self._r.set(self.generation_key, self.generation)

    def _applied_key(self, event_id: str) -> str:
        return f"{self.stream_key}:applied:{event_id}"

    def _subject_key(self, subject: str) -> str:
        return f"{self.stream_key}:subject:{subject}"

    @_guard("error memory write failed")
    def add_once(self, entries: list[MemoryEntry]) -> int:
        """Append entries not yet applied (and not forgotten); returns how many were new."""
        if not entries:
            return 0
        pipe = self._r.pipeline(transaction=False)
        for e in entries:
            self._add_once(
                keys=[
                    self._applied_key(e.event_id),
                    self.stream_key,
                    self.forgotten_ids_key,
                    self.forgotten_subjects_key,
                    self.duplicates_key,
                    self._subject_key(e.subject_id or ""),
                ],
                args=[
                    e.event_id,
                    e.domain,
                    e.label,
                    np.asarray(e.embedding, dtype=np.float32).tobytes(),
                    repr(float(e.ts)),
                    e.model_version,
                    e.subject_id or "",
                    json.dumps(list(e.mix)) if e.mix is not None else "",
                ],
                client=pipe,
            )
        return sum(1 for r in pipe.execute() if r == 1)

    @_guard("error memory forget failed")
    def forget(self, event_ids: list[str], subject_id: str | None = None) -> int:
        """Record the forget durably and append deletions for every entry it covers; returns deletions."""
        ids = list(event_ids)
        if subject_id is not None:
            self._r.sadd(self.forgotten_subjects_key, subject_id)
            ids += [m.decode() for m in self._r.smembers(self._subject_key(subject_id))]
        pipe = self._r.pipeline(transaction=False)
        for event_id in dict.fromkeys(ids):
            self._forget_id(
                keys=[self._applied_key(event_id), self.stream_key, self.forgotten_ids_key],
                args=[event_id],
                client=pipe,
            )
        return int(sum(pipe.execute()))

    @_guard("error memory read failed")
    def read_since(
        self, last_id: str, block_ms: int | None = None, count: int = 2000
    ) -> list[tuple[str, MemoryEntry | Deletion]]:
        """Operations after ``last_id`` ("0" for all), oldest first; blocks up to ``block_ms`` if none."""
        resp = self._r.xread({self.stream_key: last_id}, count=count, block=block_ms)
        out: list[tuple[str, MemoryEntry | Deletion]] = []
        for _key, items in resp or []:
            for raw_id, fields in items:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                out.append((entry_id, _decode(fields)))
        return out

    def iter_all(self) -> Iterator[MemoryEntry]:
        """Live entries (deletions applied), in write order."""
        live: dict[str, MemoryEntry] = {}
        last = "0"
        while True:
            batch = self.read_since(last)
            if not batch:
                return iter(live.values())
            for entry_id, op in batch:
                last = entry_id
                if isinstance(op, Deletion):
                    live.pop(op.event_id, None)
                else:
                    live[op.event_id] = op

    @_guard("error memory read failed")
    def duplicates(self) -> int:
        return int(self._r.get(self.duplicates_key) or 0)

    @_guard("error memory read failed")
    def __len__(self) -> int:
        return int(self._r.xlen(self.stream_key))

    @_guard("error memory reset failed")
    def drop(self) -> None:
        """Delete this generation's stream and its keys (used before a rebuild writes it again)."""
        keys = [self.stream_key, self.duplicates_key]
        for pattern in (f"{self.stream_key}:applied:*", f"{self.stream_key}:subject:*"):
            keys += list(self._r.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            self._r.delete(*keys[start : start + 1000])


def _decode(fields: dict[bytes, bytes]) -> MemoryEntry | Deletion:
    def s(name: str) -> str:
        return fields[name.encode()].decode("utf-8")

    if fields.get(b"op") == b"del":
        return Deletion(s("id"))
    return MemoryEntry(
        event_id=s("id"),
        domain=s("domain"),
        label=s("label"),
        embedding=np.frombuffer(fields[b"emb"], dtype=np.float32),
        ts=float(s("ts")),
        model_version=s("version"),
        mix=_decode_mix(fields.get(b"mix")),
    )


def _decode_mix(raw: bytes | None) -> tuple[str, float | None, float | None, float, float, float] | None:
    if raw is None:
        return None
    try:
        version, p_head, p_memory, lam, p_pre, p_neighbours = json.loads(raw)

        def opt(x) -> float | None:
            return None if x is None else float(x)

        return str(version), opt(p_head), opt(p_memory), float(lam), float(p_pre), float(p_neighbours)
    except (ValueError, TypeError):
        return None  # a malformed optional field costs the calibration one step, not the entry


class RequestEmbeddings:
    """Serving records each request's memory key under its request id for a short TTL, so feedback that
    names the request id is written without re-encoding the text."""

    def __init__(self, client: redis.Redis, cfg: RedisConfig, fingerprint: str) -> None:
        self._r = client
        self._prefix = f"{cfg.namespace}:req:{fingerprint[:16]}:"
        self._mix_prefix = f"{cfg.namespace}:reqmix:{fingerprint[:16]}:"
        self.ttl_s = cfg.request_ttl_s

    @_guard("request embedding write failed")
    def put_many(self, items: list[tuple[str, np.ndarray]], mixes: list[str | None] | None = None) -> None:
        """Each request's memory key and, where an adapter's head and the memory answered it together,
        what they said (``serving.mixing.ServedMix`` JSON), for the feedback that will judge it."""
        pipe = self._r.pipeline(transaction=False)
        for i, (request_id, emb) in enumerate(items):
            pipe.set(self._prefix + request_id, np.asarray(emb, dtype=np.float32).tobytes(), ex=self.ttl_s)
            if mixes is not None and mixes[i] is not None:
                pipe.set(self._mix_prefix + request_id, mixes[i], ex=self.ttl_s)
        pipe.execute()

    @_guard("request record read failed")
    def get_many(
        self, request_ids: list[str], dim: int
    ) -> tuple[list[np.ndarray | None], list[bytes | None]]:
        """Each request's memory key (None if expired or of another width) and its mix record (None if
        none was kept), in one round trip."""
        if not request_ids:
            return [], []
        names = [self._prefix + r for r in request_ids] + [self._mix_prefix + r for r in request_ids]
        raw = self._r.mget(names)
        keys: list[np.ndarray | None] = []
        for value in raw[: len(request_ids)]:
            vec = None if value is None else np.frombuffer(value, dtype=np.float32)
            keys.append(vec if vec is not None and vec.shape == (dim,) else None)
        return keys, list(raw[len(request_ids) :])
