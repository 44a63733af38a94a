"""Editing hyper-parameters: one typed object, with defaults measured on the default model.

The defaults for SmolLM2-135M come from the sweep recorded in ``docs/hyperparameters.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import torch

# Fixed context prefixes: the keys and z* are averaged over the bare prompt and these, so that an
# edit holds in other contexts too. Fixed (not sampled from the model) to be reproducible.
DEFAULT_PREFIXES = ("", "Here is a fact. ", "I read this today. ", "Notes: ")


def parse_layers(text: str) -> tuple[int, ...]:
    """The edited blocks as a user writes them, ``FIRST-LAST`` (``3-7``), one block (``5``) or
    a list (``3,4,5``), as the tuple of block indices they name.

    The one parser of ``--layers`` and ``EDITSERVE_LAYERS``: raises ValueError, naming what was
    given, unless the blocks are one consecutive run of non-negative indices.
    """
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            layers = tuple(range(first, last + 1))
        else:
            layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(
            f"layers {text!r}: write the edited blocks as FIRST-LAST (e.g. 3-7)"
        ) from None
    check_layers(layers, written=text)
    return layers


def check_layers(layers: tuple[int, ...], written: str | None = None) -> None:
    """Raise ValueError unless ``layers`` is one consecutive run of non-negative block indices,
    the form that every method here assumes (``written``: the text it was parsed from)."""
    given = repr(written) if written is not None else str(tuple(layers))
    if not layers:
        raise ValueError(f"layers {given}: name at least one block, FIRST-LAST with FIRST <= LAST")
    if min(layers) < 0:
        raise ValueError(f"layers {given}: block indices start at 0")
    if list(layers) != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(
            f"layers {given}: the edited blocks must be consecutive, one run written "
            f"FIRST-LAST (e.g. 3-7); got blocks {', '.join(map(str, layers))}"
        )


#: The dtypes that d4s's full solve may run in (``EditHparams.solve_dtype``).
SOLVE_DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class EditHparams:
    """How edits are computed and installed.

    layers: the consecutive blocks whose MLP output matrix is edited.
    mom2_lambda: weight of the covariance C0 in ``(lambda * C0 + S_KK)``.
    v_*: Adam on the residual delta at the last edited block (docs/algorithms.md, section 1,
        "Keys and the target z*").
    v_loss_threshold: stop once every fact's mean target NLL is below it (nats per token).
    clamp_norm_factor: ``|delta| <= clamp_norm_factor * |h|``.
    rect_keep: share of the total update's entries kept by RECT (1.0 turns RECT off).
    alpha_l2, nullspace_threshold: AlphaEdit's ridge term and null-space eigenvalue cut-off
        (relative to the largest eigenvalue of C0).
    solve_dtype: the dtype that d4s factors and solves its system in past ``LOW_RANK_ROWS``
        rows (the system is made in float64 from the exact sums either way): "float64", the
        default (docs/algorithms.md, section 2, "The D4S update"), or "float32", faster, at the
        precision of the weights it writes (``editing.d4s.solve_update``).
    memory_threshold: the cosine at which a position's key matches an entry of the keyed memory
        (``editing.keyed_memory``); 0 turns the memory off, None takes the method's own (0.9 for
        ``memory``, off for the weight methods).
    memory_margin, memory_reference_tokens: an entry matches only above the larger of
        ``memory_threshold`` and its own highest cosine against the keys of that many positions
        of ordinary text, plus ``memory_margin`` (``editing.keyed_memory``, "Thresholds"); 0
        tokens gives every entry ``memory_threshold`` alone.
    state_device: where a weight method keeps C0, its sums and factors: "auto" (beside the
        model where it fits with room and runs float64 fast, else the CPU:
        ``editing.state_device``) or a device. It moves where the work is done, not the result.
    """

    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    mom2_lambda: float = 2000.0
    v_lr: float = 0.5
    v_steps: int = 25
    v_loss_threshold: float = 0.05
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    context_prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    rect_keep: float = 0.4
    alpha_l2: float = 10.0
    nullspace_threshold: float = 2e-2
    solve_dtype: str = "float64"
    memory_threshold: float | None = None
    memory_margin: float = 0.02
    memory_reference_tokens: int = 16384
    state_device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_layers(self.layers)
        if not 0.0 < self.rect_keep <= 1.0:
            raise ValueError(f"rect_keep must be in (0, 1], got {self.rect_keep}")
        if self.mom2_lambda <= 0:
            raise ValueError(f"mom2_lambda must be positive, got {self.mom2_lambda}")
        if self.solve_dtype not in SOLVE_DTYPES:
            raise ValueError(
                f"solve_dtype must be one of {', '.join(SOLVE_DTYPES)}, got {self.solve_dtype!r}"
            )
        if self.memory_threshold is not None and not 0.0 <= self.memory_threshold <= 1.0:
            raise ValueError(f"memory_threshold must be in [0, 1], got {self.memory_threshold}")
        if not 0.0 <= self.memory_margin < 1.0:
            raise ValueError(f"memory_margin must be in [0, 1), got {self.memory_margin}")
        if self.memory_reference_tokens < 0:
            raise ValueError(
                f"memory_reference_tokens must be 0 or more, got {self.memory_reference_tokens}"
            )
        if self.state_device != "auto":
            try:
                torch.device(self.state_device)
            except RuntimeError as exc:
                raise ValueError(f"state_device must be auto or a device: {exc}") from exc
        if not self.context_prefixes or self.context_prefixes[0] != "":
            raise ValueError("context_prefixes must start with the bare prompt ''")

    @property
    def last_layer(self) -> int:
        return self.layers[-1]

    def with_(self, **changes: object) -> EditHparams:
        return replace(self, **changes)  # type: ignore[arg-type]

    def zstar_fingerprint(self) -> str:
        """A digest of the settings that determine keys and z* (not lambda, not RECT)."""
        relevant = {
            k: v
            for k, v in asdict(self).items()
            if k.startswith("v_") or k in ("layers", "kl_factor", "clamp_norm_factor")
        }
        relevant["context_prefixes"] = list(self.context_prefixes)
        relevant["seed"] = self.seed
        blob = json.dumps(relevant, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
