"""HTTP request and response bodies: strict at the edge (unknown fields rejected, sizes bounded)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streams.schemas import MAX_ID_CHARS, MAX_LABEL_CHARS, MAX_TEXT_CHARS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def _nonblank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


class PredictRequest(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    domain: str | None = Field(default=None, min_length=1, max_length=MAX_LABEL_CHARS)

    _check = field_validator("text", "domain")(_nonblank)


class PredictResponse(BaseModel):
    label: str | None = Field(description="null until the domain has any labelled feedback")
    scores: dict[str, float]
    model_version: str
    adapter: str | None
    compensated: bool
    request_id: str


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
