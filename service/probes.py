"""Locality probes: how far the served model has drifted from the original one.

A probe set is a JSON-lines file of prompts, each ``{"kind": "fact"|"text", "prompt": ...}``.
The original model's next-token distribution after every prompt is recorded once (and cached on
disk per model and probe set); after each edit or revert the live model is scored against it:

- **agreement**: the share of prompts whose most likely next token is still the original one;
- **KL**: the mean KL(original || live) of the next-token distributions, in nats;
- **perplexity ratio**: live / original perplexity over the ``text`` prompts (held-out text).

The pass scores *given* weights for the edited matrices (through a trace, see
``editing.tracing``), so an edit can be checked before it is swapped into the served model.
Editing changes only the edited blocks and those above them, so the pass starts from the hidden
state that enters the first edited block, recorded once with the rest: the blocks below it never
run again. On a CPU the pass runs on a bfloat16 copy of the model where that measures faster than
float32 (see :func:`bfloat16_faster`); the baseline is recorded on the same copy, so an unedited
model scores exactly agreement 1 and KL 0.

The model's inputs live on the model's device; the pass brings the last positions' logits to the
CPU, and the original log-probabilities they are compared with live there too, whether computed
at start-up or read from the cache (:meth:`_Batch.placed`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from editing.adapters import adapter_for
from editing.covariance import model_fingerprint
from editing.keyed_memory import KeyedMemory
from editing.models import LoadedModel, copy_model, right_padded
from editing.tracing import Trace, instrument

log = logging.getLogger(__name__)

DEFAULT_PROBES = Path(__file__).parent / "data" / "probes.jsonl"
KINDS = ("fact", "text")
_CHUNK = 64  # positions per vocabulary projection when scoring text
_FORMAT = "v2"  # of the cached baseline: bump when the pass's arithmetic changes


class ProbeSetError(ValueError):
    """The probe file cannot be read or holds no usable prompt."""


@dataclass(frozen=True)
class Probe:
    prompt: str
    kind: str = "fact"


@dataclass(frozen=True)
class ProbeReport:
    agreement: float  # share of prompts whose top next token is the original's
    kl: float  # mean KL(original || live) of the next-token distributions, nats
    perplexity_ratio: float | None  # live / original perplexity of the text prompts
    seconds: float  # how long the pass took

    def as_dict(self) -> dict[str, float | None]:
        return {
            "agreement": self.agreement,
            "kl": self.kl,
            "perplexity_ratio": self.perplexity_ratio,
            "seconds": self.seconds,
        }


def load_probes(path: Path | None = None) -> list[Probe]:
    """The probes of a JSON-lines file (the default set when ``path`` is None)."""
    path = path or DEFAULT_PROBES
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ProbeSetError(f"probe set {path}: {exc.strerror or exc}") from None
    probes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            probe = Probe(prompt=row["prompt"], kind=row.get("kind", "fact"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ProbeSetError(f"probe set {path}, line {number}: {exc}") from None
        if probe.kind not in KINDS or not isinstance(probe.prompt, str) or not probe.prompt:
            raise ProbeSetError(
                f"probe set {path}, line {number}: needs a prompt and a kind {KINDS}"
            )
        probes.append(probe)
    if not probes:
        raise ProbeSetError(f"probe set {path} holds no prompt")
    return probes


@dataclass
class _Batch:
    ids: torch.Tensor  # B x T, right-padded
    mask: torch.Tensor  # B x T
    last: torch.Tensor  # B: position of each row's last token
    text_rows: torch.Tensor  # rows that count for perplexity
    start: torch.Tensor | None  # B x T x hidden entering the first edited block (original)
    logp: torch.Tensor  # B x vocabulary: the original next-token log-probabilities
    text_nll: float  # the original summed NLL of the text rows
    text_tokens: int

    def placed(self, device: torch.device) -> _Batch:
        """This batch with the model's inputs on ``device`` and the original log-probabilities
        on the CPU, where :meth:`Prober._run` returns the logits to compare with them."""
        return replace(
            self,
            ids=self.ids.to(device),
            mask=self.mask.to(device),
            last=self.last.to(device),
            text_rows=self.text_rows.to(device),
            start=None if self.start is None else self.start.to(device),
            logp=self.logp.cpu(),
        )


class Prober:
    """Scores weights of the edited matrices against the original model on a probe set.

    ``original`` maps edited layers to their original weights (``out x in``), so the baseline
    is right even when the model already carries edits. ``dtype``: the probe model's; another
    dtype than the served model's makes a private copy. Not thread-safe: one thread (the
    worker) uses it; it never writes the served model's weights.
    """

    def __init__(
        self,
        lm: LoadedModel,
        probes: list[Probe],
        original: dict[int, torch.Tensor],
        *,
        dtype: torch.dtype | None = None,
        cache_dir: Path | None = None,
        batch_size: int = 128,
    ) -> None:
        self.lm = lm
        self.probes = probes
        self.first_layer = min(original)
        self.dtype = dtype or lm.dtype
        self.model = lm.model if self.dtype == lm.dtype else copy_model(lm.model, self.dtype)
        instrument(self.model, adapter_for(self.model))
        tok = lm.tokenizer
        rows = [tok(p.prompt)["input_ids"] for p in probes]
        # Similar lengths together: less padding.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        self._groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self._rows = rows
        self._batches = self._baseline(original, cache_dir)

    @property
    def original_perplexity(self) -> float | None:
        tokens = sum(b.text_tokens for b in self._batches)
        return math.exp(sum(b.text_nll for b in self._batches) / tokens) if tokens else None

    def fingerprint(self) -> str:
        blob = json.dumps([[p.kind, p.prompt] for p in self.probes]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def probe_set(self) -> str:
        """Which probes, scored in which dtype: a replica takes another's probe report for the
        same weights only when both name the same probe set."""
        return f"{self.fingerprint()}-{self.dtype}"

    @torch.no_grad()
    def measure(
        self, weights: dict[int, torch.Tensor], memory: KeyedMemory | None = None
    ) -> ProbeReport:
        """Score the model with ``weights`` (layer -> ``out x in``) in its edited matrices and
        ``memory`` as its keyed memory."""
        started = time.perf_counter()
        agree, kl_sum, nll, tokens = 0, 0.0, 0.0, 0
        cast = {layer: w.to(self.dtype) for layer, w in weights.items()}
        for batch in self._batches:
            start = batch.start
            trace = Trace(weights=cast, memory=memory)
            if start is not None:
                trace.start_after = self.first_layer - 1
                trace.replace_output = lambda start=start: start
            logits_last, text_nll, text_tokens = self._run(batch, trace)
            logp = F.log_softmax(logits_last, dim=-1)
            agree += int((logp.argmax(-1) == batch.logp.argmax(-1)).sum())
            kl = F.kl_div(logp, batch.logp, log_target=True, reduction="none").sum(-1)
            kl_sum += float(kl.clamp_min(0).sum())
            nll += text_nll
            tokens += text_tokens
        n = len(self.probes)
        original = self.original_perplexity
        ratio = math.exp(nll / tokens) / original if tokens and original else None
        return ProbeReport(
            agreement=agree / n,
            kl=kl_sum / n,
            perplexity_ratio=ratio,
            seconds=time.perf_counter() - started,
        )

    # -- the passes ------------------------------------------------------------------------

    def _run(self, batch: _Batch, trace: Trace) -> tuple[torch.Tensor, float, int]:
        """(last-position logits B x V, text NLL, text tokens) of one batch."""
        base, head = self.model.base_model, self.model.get_output_embeddings()
        # No attention mask: rows are padded on the right, so under causal attention no real
        # token ever sees a pad, and attention takes its faster unmasked path.
        with trace:
            out = base(input_ids=batch.ids, use_cache=False)
        hidden = out.last_hidden_state
        rows = torch.arange(len(batch.ids), device=hidden.device)
        last_logits = head(hidden[rows, batch.last]).float().cpu()  # compared on the CPU
        if not len(batch.text_rows):
            return last_logits, 0.0, 0
        mask = batch.mask[batch.text_rows, 1:].bool()
        states = hidden[batch.text_rows, :-1][mask]  # the positions that predict a text token
        targets = batch.ids[batch.text_rows, 1:][mask]
        nll = 0.0
        # In chunks: a float copy of every position's logits at once is slow to write.
        for i in range(0, len(states), _CHUNK):
            logits = head(states[i : i + _CHUNK]).float()
            nll += float(F.cross_entropy(logits, targets[i : i + _CHUNK], reduction="sum"))
        return last_logits, nll, len(states)

    @torch.no_grad()
    def _baseline(self, original: dict[int, torch.Tensor], cache_dir: Path | None) -> list[_Batch]:
        path = None
        if cache_dir is not None:
            dtype = str(self.dtype).removeprefix("torch.")
            name = f"{self.fingerprint()}-{dtype}-from{self.first_layer}-{_FORMAT}.pt"
            path = cache_dir / "probes" / model_fingerprint(self.lm) / name
            if path.exists():
                try:
                    saved = torch.load(path, map_location="cpu")
                    return [_Batch(**b).placed(self.lm.device) for b in saved]
                except Exception as exc:  # a damaged cache is recomputed, not fatal
                    log.warning("ignoring the probe cache %s: %s", path, exc)
        started = time.perf_counter()
        batches = []
        pad = self.lm.tokenizer.pad_token_id or 0
        for group in self._groups:
            ids, mask = right_padded([self._rows[i] for i in group], pad)
            ids, mask = ids.to(self.lm.device), mask.to(self.lm.device)
            text_rows = [j for j, i in enumerate(group) if self.probes[i].kind == "text"]
            batch = _Batch(
                ids=ids,
                mask=mask,
                last=mask.sum(1) - 1,
                text_rows=torch.tensor(text_rows, dtype=torch.long, device=self.lm.device),
                start=None,
                logp=torch.empty(0),
                text_nll=0.0,
                text_tokens=0,
            )
            capture = self.first_layer - 1 if self.first_layer > 0 else None
            trace = Trace(weights=dict(original), capture_block=capture)
            logits, batch.text_nll, batch.text_tokens = self._run(batch, trace)
            batch.logp = F.log_softmax(logits, dim=-1)
            if trace.block_output is not None:
                batch.start = trace.block_output.detach().clone()
            batches.append(batch)
        log.info("recorded %d probes in %.1f s", len(self.probes), time.perf_counter() - started)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save([b.placed(torch.device("cpu")).__dict__ for b in batches], tmp)
            tmp.replace(path)
        return batches


def default_dtype(lm: LoadedModel) -> torch.dtype | None:
    """bfloat16 (a copy of the model) for a float32 model on a CPU that multiplies bfloat16
    faster; else the model's own dtype. On a GPU the pass is cheap already."""
    if lm.device.type == "cpu" and lm.dtype == torch.float32 and bfloat16_faster():
        return torch.bfloat16
    return None


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), as torch reports them.

    torch's checks are private (``torch.cpu._is_*``); a torch without them reads as no bfloat16
    instructions, which keeps the probes in float32, the safe side.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@functools.cache
def bfloat16_faster() -> bool:
    """Whether this CPU runs the model's matrix products faster in bfloat16 than in float32,
    measured once on a product of the default model's MLP shape.

    The instruction flags are not enough: without bfloat16 units the arithmetic is emulated,
    far slower than float32, and even a CPU that reports AVX512-BF16 can multiply bfloat16
    slower than float32. Only a measurement tells.
    """
    if not native_bfloat16():
        return False
    x, w = torch.randn(256, 576), torch.randn(1536, 576)
    return _linear_seconds(x.bfloat16(), w.bfloat16()) < 0.8 * _linear_seconds(x, w)


def _linear_seconds(x: torch.Tensor, w: torch.Tensor, reps: int = 10) -> float:
    """The fastest of ``reps`` timings of ``x @ w.T``, after one untimed run."""
    F.linear(x, w)
    best = math.inf
    for _ in range(reps):
        started = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return best
