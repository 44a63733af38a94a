"""Every setting of the server, in one object: ``EDITSERVE_*`` variables and ``editserve serve``
flags (flags win).

API keys map a bearer token to a role::

    EDITSERVE_API_KEYS='{"s3cret-editor": "editor", "s3cret-reader": "reader"}'
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from editing.hparams import EditHparams, parse_layers
from editing.models import DEFAULT_MODEL, default_cache_dir
from service.guardrails import Guardrails


class Role(StrEnum):
    reader = "reader"  # may generate
    editor = "editor"  # may also edit and revert


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDITSERVE_", extra="ignore")

    # -- the model and the editing method --
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    serve_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="weights that generation reads: 'auto' (the model's own) or a copy in this "
        "dtype, kept in step with every edit; edits are computed in `dtype` either way",
    )
    cache_dir: Path = Field(default_factory=default_cache_dir)
    method: str = "d4s"
    layers: str | None = Field(default=None, description="edited blocks, e.g. 3-7")
    mom2_lambda: float = EditHparams().mom2_lambda
    rect_keep: float = EditHparams().rect_keep
    solve_dtype: Literal["float64", "float32"] = Field(
        default="float64",
        description="dtype of d4s's full solve past 256 key rows: 'float64', or 'float32' for "
        "about twice its speed at float32 weights' precision (README: Speed)",
    )
    v_steps: int = EditHparams().v_steps
    covariance_tokens: int = 200_000
    corpus: str = "wiki"

    # -- locality probes and guardrails (service/guardrails.py) --
    probes: str = Field(
        default="default", description="probe set: 'default', a .jsonl file, or 'off'"
    )
    guard_min_agreement: float | None = Field(default=None, ge=0, le=1)
    guard_max_delta_growth: float | None = Field(default=None, gt=0)
    guard_max_perplexity_ratio: float | None = Field(default=None, gt=0)
    guard_action: Literal["reject", "flag"] = "reject"

    # -- the edit log --
    data_dir: Path = Path("data")
    redis_url: str | None = None
    redis_prefix: str = "editserve"

    # -- replicas on one log --
    replica_id: str | None = Field(
        default=None, description="this replica's name in leases (default: host name and pid)"
    )
    lease_seconds: float = Field(
        default=15.0,
        gt=0,
        description="an edit's lease: a replica that dies computing an edit loses it after this",
    )
    min_version_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        description="how long a request with `min_version` waits for this replica to catch up "
        "before a 503 with Retry-After",
    )

    # -- the network and access --
    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False
    api_keys: dict[str, Role] = Field(default_factory=dict)

    # -- limits --
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 1536
    max_new_tokens: int = 512
    max_queued_edits: int = 64
    max_queued_requests: int = 256
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    max_facts_per_edit: int = 32
    edit_batch: int = Field(
        default=16,
        ge=1,
        description="queued edits that share one batched z* optimisation, one solve and one "
        "probe pass (methods whose z* depend on W0 only; the sequential baselines take 1)",
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

    def hparams(self) -> EditHparams:
        changes: dict[str, object] = {
            "mom2_lambda": self.mom2_lambda,
            "rect_keep": self.rect_keep,
            "v_steps": self.v_steps,
            "solve_dtype": self.solve_dtype,
        }
        if self.layers:
            changes["layers"] = parse_layers(self.layers)
        return EditHparams().with_(**changes)

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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
