"""Every setting of the server, in one object: ``EDITSERVE_*`` variables and ``editserve serve``
flags (flags win).

API keys map a bearer token to its holder, named for the audit trail, or to a bare role::

    EDITSERVE_API_KEYS='{"s3cret-1": {"name": "data-team", "role": "editor"}, "s3cret-2": "reader"}'
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from editing.calibrate import Calibration
from editing.hparams import EditHparams, parse_layers
from editing.methods import DEFAULT_METHOD
from editing.models import DEFAULT_MODEL, default_cache_dir
from service.guardrails import Guardrails


class Role(StrEnum):
    reader = "reader"  # may generate
    editor = "editor"  # may also edit and revert


class ApiKey(BaseModel):
    """An API key's holder: the name the audit trail records, and the role."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Role

    @classmethod
    def of(cls, key: str, held: ApiKey | Role) -> ApiKey:
        """``held`` as a holder: a bare role is named ``key-`` and the start of the key's
        sha256, which names it without showing it."""
        if isinstance(held, ApiKey):
            return held
        return cls(name=f"key-{hashlib.sha256(key.encode()).hexdigest()[:8]}", role=held)


_HPARAMS = EditHparams()
_DTYPES = Literal["auto", "float32", "bfloat16", "float16"]


class Settings(BaseSettings):
    """Each field's description is its one account: ``editserve serve --help`` and the
    configuration table (docs/configuration.md) are made from it."""

    model_config = SettingsConfigDict(env_prefix="EDITSERVE_", extra="ignore")

    # -- the model and the editing method --
    model: str = Field(
        default=DEFAULT_MODEL,
        description="The model to serve: an alias (smollm2-135m, gemma3-270m), a local Hugging "
        "Face directory or a hub id.",
    )
    device: str = Field(
        default="auto",
        description="Where the model runs: auto (CUDA when present, else the CPU), cpu, cuda "
        "or cuda:N.",
    )
    dtype: _DTYPES = Field(
        default="auto",
        description="The dtype the model is loaded and edits are computed in: auto is float32 "
        "on the CPU and bfloat16 on a GPU.",
    )
    serve_dtype: _DTYPES = Field(
        default="auto",
        description="The weights generation reads: auto (the model's own) or a copy in this "
        "dtype that every edit keeps in step; edits are computed at the dtype setting either "
        "way.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where converted models, covariance statistics and probe baselines are "
        "kept ($XDG_CACHE_HOME/editserve when XDG_CACHE_HOME is set).",
        json_schema_extra={"shown_default": "~/.cache/editserve"},
    )
    method: str = Field(
        default=DEFAULT_METHOD,
        description="The editing method: d4s, memory (the keyed memory alone, the weights "
        "stay the original's), or one of the sequential baselines memit-seq and alphaedit.",
    )
    layers: str | None = Field(
        default=None,
        description="The edited blocks: one consecutive run, written FIRST-LAST. Unset: the "
        "model's calibration (`editserve calibrate`); a model without one is refused.",
    )
    mom2_lambda: float | None = Field(
        default=None,
        description="The weight of the covariance C0 in the system every update solves, "
        "lambda * C0 + the sum of k k^T over the edits' keys. Unset: the model's calibration.",
    )
    rect_keep: float = Field(
        default=_HPARAMS.rect_keep,
        description="The share of each matrix's update entries that RECT keeps, the largest "
        "relative to W0 (1 turns RECT off).",
    )
    memory_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="The cosine at which a position's key matches an entry of the keyed memory; "
        "0 turns the memory off. Unset: the method's own (0.9 for memory, off for the others).",
    )
    memory_reference_tokens: int = Field(
        default=_HPARAMS.memory_reference_tokens,
        ge=0,
        description="Positions of ordinary text (the covariance corpus, collected once and "
        "cached) whose nearest key sets each memory entry's own threshold; 0: the threshold alone.",
    )
    solve_dtype: Literal["float64", "float32"] = Field(
        default="float64",
        description="The dtype of d4s's full solve past 256 key rows: float32 is faster, at "
        "the precision of float32 weights.",
    )
    state_device: str = Field(
        default="auto",
        description="Where a weight method keeps C0 and its sums: auto (beside the model if they "
        "fit and its float64 is fast, else the CPU), cpu, cuda or cuda:N; memory keeps none.",
    )
    v_steps: int | None = Field(
        default=None,
        description="The most Adam steps of each edit's z* optimisation (it stops sooner once "
        "every fact's target is learnt). Unset: the model's calibration.",
    )
    covariance_tokens: int = Field(
        default=200_000,
        description="Corpus tokens the covariance C0 is computed over (once per model, "
        "corpus and count; cached in cache_dir).",
    )
    corpus: str = Field(
        default="wiki",
        description="The covariance's text: wiki (the bundled Wikipedia sample), a .txt, "
        ".json or .jsonl file, or hf:NAME.",
    )

    # -- locality probes and guardrails (service/guardrails.py) --
    probes: str = Field(
        default="default",
        description="The locality probe set checked after every edit: default, a .jsonl "
        "file, or off.",
    )
    guard_min_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Guardrail: the least share of locality probes that must keep the "
        "unedited model's top next token (unset: off).",
    )
    guard_max_delta_growth: float | None = Field(
        default=None,
        gt=0,
        description="Guardrail: the most one edit may raise an edited matrix's mean "
        "|W - W0|, as a share of its mean |W0| (unset: off).",
    )
    guard_max_perplexity_ratio: float | None = Field(
        default=None,
        gt=0,
        description="Guardrail: the highest held-out perplexity allowed, as a multiple of the "
        "unedited model's (unset: off).",
    )
    guard_action: Literal["reject", "flag"] = Field(
        default="reject",
        description="What a guardrail breach does: reject rolls the edit back, flag keeps it "
        "and marks it.",
    )
    retention_sample: int = Field(
        default=8,
        ge=0,
        description="Active facts re-scored after each edit this replica computes, rotating "
        "oldest first: does P(target_new) still beat P(ground_truth)? (0: off).",
    )

    # -- the edit log --
    data_dir: Path = Field(
        default=Path("data"),
        description="The folder of the SQLite edit log, used when redis_url is unset.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Follow the edit log in this Redis (redis://host:port/db) instead of "
        "SQLite; replicas share it.",
    )
    redis_prefix: str = Field(
        default="editserve",
        description="The prefix of the log's keys in Redis: replicas of one model share it.",
    )

    # -- replicas on one log --
    replica_id: str | None = Field(
        default=None,
        description="This replica's name in edit leases (unset: host name and process id).",
    )
    lease_seconds: float = Field(
        default=15.0,
        gt=0,
        description="Seconds an edit's lease lasts unrenewed: a replica that dies computing an "
        "edit loses it to another after this.",
    )
    min_version_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Seconds a request with min_version waits for this replica to catch up "
        "before a 503 with Retry-After.",
    )

    # -- the network and access --
    host: str = Field(
        default="127.0.0.1",
        description="The address to listen on; beyond loopback it needs api_keys or insecure.",
    )
    port: int = Field(default=8000, description="The TCP port to listen on.")
    insecure: bool = Field(
        default=False,
        description="Allow listening beyond loopback without API keys: anyone who reaches the "
        "port may edit the model.",
    )
    api_keys: dict[str, ApiKey | Role] = Field(
        default_factory=dict,
        description="A JSON object mapping each bearer token to its holder, "
        '{"name": "data-team", "role": "editor"}, or to a role alone (reader or editor; the '
        "key is then named by a short hash of it). The name is what the audit trail records "
        "(unset: no keys, loopback only).",
    )
    metrics_require_key: bool = Field(
        default=False,
        description="Require an API key (any role) on /metrics; Prometheus then sends one "
        "(authorization in its scrape config). Off: /metrics is open, for a scrape over the "
        "cluster network.",
    )
    require_reason: bool = Field(
        default=False, description="Refuse an edit or a revert that gives no reason (422)."
    )

    # -- limits --
    max_body_bytes: int = Field(
        default=1_000_000,
        description="The largest request body accepted, in bytes (413 beyond it).",
    )
    max_prompt_tokens: int = Field(
        default=1536,
        description="The longest prompt, and the longest fact text, accepted, in tokens.",
    )
    max_new_tokens: int = Field(
        default=512, description="The most tokens one generation request may ask for."
    )
    max_previews: int = Field(
        default=1,
        ge=1,
        description="POST /edits/preview requests computed at once; 429 beyond them.",
    )
    preview_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long a preview waits for the worker (busy with edits) before a 503.",
    )
    max_queued_edits: int = Field(
        default=64,
        description="Edit operations that may wait for this replica; POST /edits answers 429 "
        "with Retry-After beyond them.",
    )
    max_queued_requests: int = Field(
        default=256,
        description="Generation requests that may wait for a batch; more are answered 429.",
    )
    max_batch_size: int = Field(
        default=8,
        description="The most generation requests decoded together in one batch.",
    )
    batch_window_ms: float = Field(
        default=10.0,
        description="Milliseconds the batcher waits for more requests once one has arrived, "
        "so that they share a batch.",
    )
    max_facts_per_edit: int = Field(
        default=32,
        description="The most facts one POST /edits may carry.",
    )
    edit_batch: int = Field(
        default=16,
        ge=1,
        description="Queued edits that share one batched z* optimisation, one solve and one "
        "probe pass (d4s only; the sequential baselines take 1).",
    )

    @model_validator(mode="after")
    def _guards_need_probes(self) -> Settings:
        needs_probes = (self.guard_min_agreement, self.guard_max_perplexity_ratio)
        if self.probes == "off" and any(v is not None for v in needs_probes):
            raise ValueError("the agreement and perplexity guardrails need probes (not 'off')")
        return self

    @field_validator("layers")
    @classmethod
    def _layers_form(cls, value: str | None) -> str | None:
        if value is not None:
            parse_layers(value)
        return value

    def hparams(self, calibration: Calibration | None = None) -> EditHparams:
        """The settings given, over the model's ``calibration``, over the defaults."""
        changes: dict[str, object] = {
            "rect_keep": self.rect_keep,
            "solve_dtype": self.solve_dtype,
            "state_device": self.state_device,
            "memory_threshold": self.memory_threshold,
            "memory_reference_tokens": self.memory_reference_tokens,
        }
        given = {
            "layers": parse_layers(self.layers) if self.layers is not None else None,
            "mom2_lambda": self.mom2_lambda,
            "v_steps": self.v_steps,
        }
        changes.update({name: value for name, value in given.items() if value is not None})
        base = calibration.hparams() if calibration is not None else EditHparams()
        return base.with_(**changes)

    def guardrails(self) -> Guardrails:
        return Guardrails(
            min_agreement=self.guard_min_agreement,
            max_delta_growth=self.guard_max_delta_growth,
            max_perplexity_ratio=self.guard_max_perplexity_ratio,
            action=self.guard_action,
        )

    def probe_path(self) -> Path | None:
        """The probe set's file; None for the default set. Raises when probes are off."""
        if self.probes == "off":
            raise ValueError("probes are off")
        return None if self.probes == "default" else Path(self.probes)

    def log_kind(self) -> str:
        """Which edit log the settings select: ``redis`` or ``sqlite``."""
        return "redis" if self.redis_url else "sqlite"

    def loopback_only(self) -> bool:
        return is_loopback(self.host)

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback with no API keys, unless told ``insecure``."""
        if not self.api_keys and not self.loopback_only() and not self.insecure:
            raise ValueError(
                f"refusing to listen on {self.host} without API keys: anyone could edit the "
                "model. Set EDITSERVE_API_KEYS, listen on 127.0.0.1, or pass --insecure."
            )


# Settings that no flag sets: bearer tokens on a command line would show in `ps` and in shell
# histories.
ENV_ONLY = frozenset({"api_keys"})


def env_var(name: str) -> str:
    """The environment variable of setting ``name``: ``EDITSERVE_<NAME>``."""
    return f"{Settings.model_config.get('env_prefix', '')}{name.upper()}"


def flag(name: str) -> str | None:
    """The ``editserve serve`` flag of setting ``name``: ``--<name-with-dashes>``, or None for
    one that only the environment sets (``ENV_ONLY``)."""
    return None if name in ENV_ONLY else "--" + name.replace("_", "-")


def shown_default(name: str) -> str:
    """Setting ``name``'s default as a user would write it: ``unset`` for None, ``true`` and
    ``false``, ``15`` for 15.0; a default made at start-up shows its ``shown_default``."""
    field = Settings.model_fields[name]
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:
        return str(extra["shown_default"])
    value = field.get_default(call_default_factory=True)
    if value is None or value == {}:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
