"""Versioned wire schemas.

The stream side is tolerant: unknown fields are ignored (and counted by the caller), a small set of keys
is required, and every event carries ``schema_version``. The HTTP edge (in ``serving``) is strict.
"""

from __future__ import annotations

import json
import time
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streams.errors import InvalidEvent

FEEDBACK_SCHEMA_VERSION = 1
FORGET_SCHEMA_VERSION = 1
ROLLOUT_SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 256 * 1024
MAX_TEXT_CHARS = 20_000
MAX_LABEL_CHARS = 128
MAX_ID_CHARS = 256
DEFAULT_DOMAIN = "default"


class FeedbackEvent(BaseModel):
    """A labelled example: the truth for ``text`` in ``domain``. ``event_id`` is the idempotency key."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = FEEDBACK_SCHEMA_VERSION
    event_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS)
    domain: str = Field(default=DEFAULT_DOMAIN, min_length=1, max_length=MAX_LABEL_CHARS)
    request_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    subject_id: str | None = Field(default=None, max_length=MAX_ID_CHARS, description="who it is about")
    ts: float = Field(default_factory=time.time)

    @field_validator("text", "label", "event_id", "domain")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("domain", mode="before")
    @classmethod
    def _default_domain(cls, value: Any) -> Any:
        return DEFAULT_DOMAIN if value is None else value

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class ForgetEvent(BaseModel):
    """Remove everything derived from these events, or from every event about this subject."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = FORGET_SCHEMA_VERSION
    forget_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    event_ids: tuple[str, ...] = Field(default=(), max_length=10_000)
    subject_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    reason: str = Field(default="", max_length=1000)
    ts: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _has_target(self) -> ForgetEvent:
        if not self.event_ids and self.subject_id is None:
            raise ValueError("a forget event needs event_ids or subject_id")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class RolloutEvent(BaseModel):
    """An audit record of a decision about a model version: who or what decided, when, why, metrics."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = ROLLOUT_SCHEMA_VERSION
    type: str = Field(description="promoted | rejected | canary | shadow | rolled_back | paused")
    domain: str
    version: str
    parent: str | None = None
    actor: str = "learner"
    reason: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    ts: float = Field(default_factory=time.time)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


E = TypeVar("E", bound=BaseModel)


class Parsed(BaseModel, Generic[E]):
    """A parsed event plus what tolerant parsing passed over (for the unknown-field counter)."""

    event: E
    unknown_fields: tuple[str, ...] = ()


def parse_event(raw: bytes | None, model: type[E], max_version: int) -> Parsed[E]:
    """Bytes from Kafka -> event, or :class:`InvalidEvent` with a reason fit for a dead-letter header."""
    if raw is None:
        raise InvalidEvent("empty", "message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversize", f"{len(raw)} bytes > {MAX_EVENT_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("bad_utf8", str(exc)) from exc
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent("bad_json", str(exc)) from exc
    if not isinstance(payload, dict):
        raise InvalidEvent("not_an_object", f"top-level JSON is {type(payload).__name__}")
    version = payload.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= max_version:
        raise InvalidEvent("unsupported_schema_version", repr(version))
    try:
        event = model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "?"
        kind = "missing_field" if first.get("type") == "missing" else "invalid_field"
        raise InvalidEvent(kind, f"{field}: {first.get('msg')}") from exc
    unknown = tuple(sorted(set(payload) - set(model.model_fields)))
    return Parsed[model](event=event, unknown_fields=unknown)  # type: ignore[valid-type]


def parse_feedback(raw: bytes | None) -> Parsed[FeedbackEvent]:
    return parse_event(raw, FeedbackEvent, FEEDBACK_SCHEMA_VERSION)


def parse_forget(raw: bytes | None) -> Parsed[ForgetEvent]:
    return parse_event(raw, ForgetEvent, FORGET_SCHEMA_VERSION)


class ArtifactManifest(BaseModel):
    """What a published adapter artifact claims about itself; loaders verify every hash before use."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = 1
    kind: str = "lora_head"
    domain: str
    version: str
    parent: str | None = None
    base_fingerprint: str
    labels: list[str]
    files: dict[str, str]  # relative path -> sha256
    lora: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    data_window: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
