"""Redis-backed stores: the error-memory log, idempotency keys and the registry's active pointers.

The error memory is an append-only Redis Stream per base-model fingerprint. Writers append through one
Lua script that also sets the event's idempotency key, so a redelivered Kafka message is applied at most
once; readers (serving replicas) tail the stream into an in-process index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis
from redis.exceptions import RedisError

from streams.errors import StoreUnavailable

_ADD_ONCE = """
if redis.call('SET', KEYS[1], ARGV[7], 'NX') then
  redis.call('XADD', KEYS[2], '*', 'op', 'add', 'id', ARGV[1], 'domain', ARGV[2], 'label', ARGV[3],
             'emb', ARGV[4], 'ts', ARGV[5], 'version', ARGV[6])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:16379/0"
    namespace: str = "ds"
    socket_timeout_s: float = 2.0


@dataclass(frozen=True)
class MemoryEntry:
    event_id: str
    domain: str
    label: str
    embedding: np.ndarray  # float32, L2-normalised
    ts: float
    model_version: str


def connect(cfg: RedisConfig) -> redis.Redis:
    return redis.Redis.from_url(
        cfg.url,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.socket_timeout_s,
        health_check_interval=10,
    )


class MemoryLog:
    """The error memory for one base model (``fingerprint``): append once, tail from an id."""

    def __init__(self, client: redis.Redis, cfg: RedisConfig, fingerprint: str) -> None:
        self._r = client
        self._ns = cfg.namespace
        self.stream_key = f"{cfg.namespace}:mem:{fingerprint[:16]}:log"
        self._add_once = client.register_script(_ADD_ONCE)

    def _applied_key(self, event_id: str) -> str:
        return f"{self._ns}:applied:{self.stream_key}:{event_id}"

    def add_once(self, entries: list[MemoryEntry]) -> int:
        """Append entries not yet applied; returns how many were new. Atomic per entry."""
        if not entries:
            return 0
        try:
            pipe = self._r.pipeline(transaction=False)
            for e in entries:
                self._add_once(
                    keys=[self._applied_key(e.event_id), self.stream_key],
                    args=[
                        e.event_id,
                        e.domain,
                        e.label,
                        np.asarray(e.embedding, dtype=np.float32).tobytes(),
                        repr(float(e.ts)),
                        e.model_version,
                        "1",
                    ],
                    client=pipe,
                )
            return int(sum(pipe.execute()))
        except RedisError as exc:
            raise StoreUnavailable(f"error memory write failed: {exc}") from exc

    def read_since(
        self, last_id: str, block_ms: int | None = None, count: int = 2000
    ) -> list[tuple[str, MemoryEntry]]:
        """Entries after ``last_id`` ("0" for all), oldest first; blocks up to ``block_ms`` if none."""
        try:
            resp = self._r.xread({self.stream_key: last_id}, count=count, block=block_ms)
        except RedisError as exc:
            raise StoreUnavailable(f"error memory read failed: {exc}") from exc
        out: list[tuple[str, MemoryEntry]] = []
        for _key, items in resp or []:
            for raw_id, fields in items:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                out.append((entry_id, _decode(fields)))
        return out

    def iter_all(self) -> Iterator[MemoryEntry]:
        last = "0"
        while True:
            batch = self.read_since(last)
            if not batch:
                return
            for entry_id, entry in batch:
                last = entry_id
                yield entry

    def __len__(self) -> int:
        try:
            return int(self._r.xlen(self.stream_key))
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc


def _decode(fields: dict[bytes, bytes]) -> MemoryEntry:
    def s(name: str) -> str:
        return fields[name.encode()].decode("utf-8")

    return MemoryEntry(
        event_id=s("id"),
        domain=s("domain"),
        label=s("label"),
        embedding=np.frombuffer(fields[b"emb"], dtype=np.float32),
        ts=float(s("ts")),
        model_version=s("version"),
    )


class RegistryPointers:
    """Which artifact version each domain serves. Serving polls it; learners and operators set it."""

    def __init__(self, client: redis.Redis, cfg: RedisConfig) -> None:
        self._r = client
        self.key = f"{cfg.namespace}:registry:active"

    def set_active(self, domain: str, version: str) -> None:
        try:
            self._r.hset(self.key, domain, version)
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def active(self) -> dict[str, str]:
        try:
            raw = self._r.hgetall(self.key)
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return {k.decode(): v.decode() for k, v in raw.items()}
