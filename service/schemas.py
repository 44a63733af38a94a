"""Request and response bodies of the native endpoints (edits, generation, health).

The OpenAI-compatible bodies are in :mod:`service.api.openai_schemas`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from service.editlog.base import EditEntry, EditStatus
from service.errors import ProblemDetail
from service.retention import EditCheck

_TEXT = Field(min_length=1, max_length=2000)


class StrictModel(BaseModel):
    # strict: "true" is not a boolean and "3" is not a number.
    model_config = ConfigDict(extra="forbid", strict=True)


# -- edits ---------------------------------------------------------------------------------


class LocalityIn(StrictModel):
    prompt: str = _TEXT
    answer: str | None = Field(default=None, min_length=1, max_length=2000)


class FactIn(StrictModel):
    """One fact: after ``prompt`` (which contains ``subject``), the model should say
    ``target_new``."""

    subject: str = _TEXT
    prompt: str = _TEXT
    target_new: str = _TEXT
    ground_truth: str | None = Field(default=None, min_length=1, max_length=2000)
    paraphrases: list[str] = Field(default_factory=list, max_length=16)
    locality: list[LocalityIn] = Field(default_factory=list, max_length=16)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _subject_in_prompt(self) -> FactIn:
        if self.subject not in self.prompt:
            raise ValueError("subject must occur in prompt")
        for p in self.paraphrases:
            if not p.strip():
                raise ValueError("paraphrases must not be blank")
        return self


_REASON = Field(
    default=None,
    min_length=1,
    max_length=1000,
    description="why: kept in the edit's audit trail (required when the server says so)",
)


class FactEditIn(FactIn):
    """One fact to edit, and why."""

    reason: str | None = _REASON


class BatchIn(StrictModel):
    """Several facts, applied together as one edit step, and why."""

    facts: list[FactIn] = Field(min_length=1)
    reason: str | None = _REASON


def _edit_kind(body: Any) -> str:
    return "batch" if isinstance(body, dict) and "facts" in body else "fact"


# One fact, or ``{"facts": [...]}``; told apart by the ``facts`` key so that errors speak of
# the form that was meant.
EditRequest = Annotated[
    Annotated[FactEditIn, Tag("fact")] | Annotated[BatchIn, Tag("batch")],
    Discriminator(_edit_kind),
]


_PROMPTS: Any = Field(
    default_factory=list,
    max_length=8,
    description="prompts to generate from greedily, before and after the edit",
)


class FactPreviewIn(FactEditIn):
    """One fact to preview, and prompts to try."""

    prompts: list[Annotated[str, _TEXT]] = _PROMPTS


class BatchPreviewIn(BatchIn):
    """Several facts to preview as one edit step, and prompts to try."""

    prompts: list[Annotated[str, _TEXT]] = _PROMPTS


PreviewRequest = Annotated[
    Annotated[FactPreviewIn, Tag("fact")] | Annotated[BatchPreviewIn, Tag("batch")],
    Discriminator(_edit_kind),
]


class Generation(BaseModel):
    prompt: str
    before: str
    after: str


class PreviewOut(BaseModel):
    """What an edit would do, computed as the worker computes it, and then dropped."""

    scores: dict[str, Any] = Field(
        description="as an applied edit's: P(target_new) before/after on the prompt and "
        "paraphrases, the locality prompts' drift, the probe pass of the weights it would leave"
    )
    verdict: Literal["pass", "flag", "reject"] = Field(
        description="the guardrails' verdict: reject means POST /edits would reject it"
    )
    would_supersede: list[str] = Field(description="active edits of the same subject and prompt")
    generations: list[Generation]
    model_version: int = Field(description="the served version, unchanged by the preview")
    weights_digest: str | None = None


class RevertIn(StrictModel):
    """Why an edit is reverted."""

    reason: str | None = _REASON


class EditAccepted(BaseModel):
    id: str
    status: EditStatus
    position: int = Field(description="operations ahead of this one in the log, plus one")


class AuditEventOut(BaseModel):
    """One operation on an edit: what, when, by whom (an API key's name, or ``editserve``),
    why and from where."""

    at: datetime
    action: Literal["apply", "revert", "cancel", "supersede", "reject", "fail"]
    by: str
    reason: str | None = None
    user_agent: str | None = None

    @classmethod
    def of(cls, event: dict[str, Any]) -> Self:
        fields: dict[str, Any] = {k: event.get(k) for k in cls.model_fields}
        return cls.model_validate({**fields, "at": _time(event["at"])})


class AuditOut(AuditEventOut):
    edit_id: str


class AuditPage(BaseModel):
    events: list[AuditOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next, older page")


class EditOut(BaseModel):
    id: str
    status: EditStatus
    facts: list[FactIn]
    submitted_by: str | None = Field(
        default=None, description="the name of the API key that posted the edit"
    )
    reason: str | None = None
    user_agent: str | None = None
    history: list[AuditEventOut] = Field(
        default_factory=list, description="every operation on the edit, oldest first"
    )
    created_at: datetime
    updated_at: datetime
    applied_at: datetime | None = None
    reverted_at: datetime | None = None
    model_version: int | None = Field(
        default=None, description="the model version at which the edit took effect"
    )
    reverted_version: int | None = None
    cancelled: bool = False
    superseded_by: str | None = None
    computed_by: str | None = Field(
        default=None, description="the replica that computed the edit's record"
    )
    error: ProblemDetail | None = None
    scores: dict[str, Any] | None = Field(
        default=None,
        description="P(target_new) before/after on the prompt and paraphrases; drift of the "
        "next-token distribution on the locality prompts",
    )
    retention_checked_at: datetime | None = Field(
        default=None,
        description="when this replica last re-scored the edit on its served weights (null: "
        "not checked here: not yet, computed by another replica, no fact with a ground_truth, "
        "or no longer in effect); kept in this replica's memory, not in the log",
    )
    retention_held: bool | None = Field(
        default=None,
        description="whether, at that check, P(target_new) still beat P(ground_truth) on the "
        "prompt of every fact of the edit that was checked",
    )

    @classmethod
    def of(cls, entry: EditEntry, check: EditCheck | None = None) -> EditOut:
        """``entry`` as the API shows it, with this replica's last retention ``check``."""
        return cls(
            id=entry.id,
            status=entry.status,
            facts=[FactIn(**f) for f in entry.facts],
            submitted_by=entry.submitted_by,
            reason=entry.reason,
            user_agent=entry.user_agent,
            history=[AuditEventOut.of(event) for event in entry.history],
            created_at=_time(entry.created_at),
            updated_at=_time(entry.updated_at),
            applied_at=_time(entry.applied_at) if entry.applied_at else None,
            reverted_at=_time(entry.reverted_at) if entry.reverted_at else None,
            model_version=entry.model_version,
            reverted_version=entry.reverted_version,
            cancelled=entry.cancelled,
            superseded_by=entry.superseded_by,
            computed_by=entry.computed_by,
            error=ProblemDetail(**entry.error) if entry.error else None,
            scores=entry.scores,
            retention_checked_at=_time(check.checked_at) if check else None,
            retention_held=check.held if check else None,
        )


class EditPage(BaseModel):
    edits: list[EditOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next, older page")


def _time(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


# -- generation (TGI's shape) --------------------------------------------------------------


class GenerateParameters(StrictModel):
    max_new_tokens: int = Field(default=20, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    do_sample: bool = False
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=8)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100.0)
    details: bool = False


def min_version_field() -> Any:
    """The ``min_version`` field (read your own writes) of every request that generates."""
    return Field(
        default=None,
        ge=0,
        description="read your own writes: answer only from a model that includes the log up "
        "to this version (an edit's `model_version`); a replica behind it waits, then answers "
        "503 with Retry-After",
    )


class GenerateRequest(StrictModel):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False
    min_version: int | None = min_version_field()


class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[TokenOut] = Field(default_factory=list)
    tokens: list[TokenOut] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    model_version: int
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None


class StreamEvent(BaseModel):
    """One server-sent event of ``/generate_stream`` (TGI's format)."""

    index: int
    token: TokenOut
    generated_text: str | None = None
    details: StreamDetails | None = None
    model_version: int


# -- health --------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    phase: str
    model_loaded: bool
    log_reachable: bool
    caught_up: bool
    processed: int
    log_end: int | None
    detail: str | None = Field(
        default=None, description="why not ready: the start-up step under way, or the error"
    )
    progress: float | None = Field(
        default=None, description="share of the start-up step under way done (0 to 1), if known"
    )


class WeightsMismatch(BaseModel):
    edit_id: str = Field(description="the edit whose record was checked")
    model_version: int
    computed_by: str | None = Field(description="the replica that computed the record")
    theirs: str = Field(description="that replica's weights digest at this version")
    ours: str = Field(description="this replica's")


class LogLost(BaseModel):
    at: float = Field(description="when this replica noticed, Unix seconds")
    handled_to: int = Field(description="the last log seq this replica had handled")
    log_end: int = Field(description="the seq the log now ends at (its rebuild's last)")
    model_version_before: int
    model_version: int = Field(description="the version rebuilt from what the log holds")
    lost_applies: list[str]
    lost_reverts: list[str] = Field(description="edits whose revert was lost: active again")


class MemoryInfo(BaseModel):
    threshold: float = Field(description="the match cosine; 0: the method uses no memory")
    entries: int = Field(description="the keyed memory's entries (a fact has one per z* row)")
    bytes: int = Field(description="the memory's keys and values, on the model's device")


class Info(BaseModel):
    model: str
    device: str
    dtype: str = Field(description="the dtype of the weights that generation reads")
    edit_dtype: str = Field(description="the dtype edits are computed in")
    method: str
    edited_layers: list[int]
    model_version: int
    active_edits: int
    active_facts: int
    memory: MemoryInfo
    weights_digest: str = Field(
        description="digest of the edited matrices' bits (taken on their device) and of the "
        "keyed memory's entries: equal digests mean an identical served model"
    )
    weights_mismatch: WeightsMismatch | None = Field(
        default=None,
        description="set while this replica's weights differ from those of the replica that "
        "computed the last record it checked (replicas on one log should be identical)",
    )
    log_lost: LogLost | None = Field(
        default=None, description="set once the log lost operations this replica had handled"
    )
    probes: dict[str, float | None] | None = Field(
        default=None,
        description="the locality probes' last pass on the served model: agreement with the "
        "original's top token, KL and perplexity ratio (null: probes off)",
    )
    layer_change: dict[str, float] = Field(
        default_factory=dict,
        description="mean |W - W0| of each edited block's matrix (0 while the weights are W0)",
    )
    log: str
