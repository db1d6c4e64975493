"""HTTP request and response bodies: strict at the edge (unknown fields rejected, sizes bounded)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from streams.schemas import MAX_ID_CHARS, MAX_LABEL_CHARS, MAX_TEXT_CHARS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def _nonblank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]


class PredictRequest(_Strict):
    """One text (``text``) or many (``texts``), optionally for a named domain."""

    text: Text | None = None
    texts: list[Text] | None = Field(default=None, min_length=1)
    domain: str | None = Field(default=None, min_length=1, max_length=MAX_LABEL_CHARS)

    _check = field_validator("text", "domain")(_nonblank)

    @field_validator("texts")
    @classmethod
    def _each_nonblank(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not t.strip() for t in value):
            raise ValueError("texts must not contain empty or whitespace strings")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of text or texts")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class PredictResponse(BaseModel):
    domain: str = Field(description="the domain named, or the one chosen by adapter retrieval")
    label: str | None = Field(description="null until the domain has any labelled feedback")
    scores: dict[str, float]
    model_version: str
    adapter: str | None
    compensated: bool
    request_id: str


class PredictManyResponse(BaseModel):
    predictions: list[PredictResponse]


class FeedbackRequest(_Strict):
    event_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS)
    domain: str | None = Field(default=None, min_length=1, max_length=MAX_LABEL_CHARS)
    request_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)

    _check = field_validator("event_id", "text", "label", "domain")(_nonblank)
    subject_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)


class ForgetRequest(_Strict):
    forget_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    event_ids: list[str] = Field(default_factory=list, max_length=10_000)
    subject_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    reason: str = Field(default="", max_length=1000)

    @model_validator(mode="after")
    def _has_target(self) -> ForgetRequest:
        if not self.event_ids and self.subject_id is None:
            raise ValueError("give event_ids or subject_id")
        return self


class FeedbackAccepted(BaseModel):
    event_id: str
    topic: str
    partition: int
    offset: int


class ErrorBody(BaseModel):
    error: str
    error_type: str


# -- Open Inference Protocol (KServe v2 REST) -------------------------------------------------------------


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(min_length=1, max_length=1)
    outputs: list[dict[str, Any]] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


def decode_v2_request(raw: bytes, header_length: str | None) -> V2InferRequest:
    """Parse a v2 infer body; with the binary extension, BYTES tensors come after the JSON header as
    4-byte little-endian length-prefixed strings. Errors are BadRequest (400) with the reason."""
    from pydantic import ValidationError

    from serving.errors import BadRequest

    try:
        if header_length is None:
            return V2InferRequest.model_validate_json(raw)
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} does not fit the body")
        n = int(header_length)
        header = json.loads(raw[:n])
        binary = raw[n:]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BadRequest(f"{where or 'body'}: {first.get('msg')}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc
    offset = 0
    for tensor in header.get("inputs", []) if isinstance(header, dict) else []:
        params = tensor.get("parameters") or {}
        size = params.pop("binary_data_size", None)
        if size is None:
            continue
        chunk, offset = binary[offset : offset + int(size)], offset + int(size)
        if tensor.get("datatype") != "BYTES":
            raise BadRequest(f"binary input {tensor.get('name')!r} must be BYTES")
        texts, pos = [], 0
        while pos + 4 <= len(chunk):
            length = int.from_bytes(chunk[pos : pos + 4], "little")
            texts.append(chunk[pos + 4 : pos + 4 + length].decode("utf-8", errors="strict"))
            pos += 4 + length
        tensor["data"] = texts
        tensor["parameters"] = params or None
    try:
        return V2InferRequest.model_validate(header)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BadRequest(f"{where or 'body'}: {first.get('msg')}") from exc


class AdminAction(BaseModel):
    """Body of ``POST /admin/rollout/{domain}/{action}``."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=1000)
    operator: str | None = Field(default=None, max_length=128, description="who asks (audit log)")
    version: str | None = Field(default=None, max_length=128, description="promote: this version")
