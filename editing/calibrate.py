"""Settings measured on a model instead of tuned by hand: ``editserve calibrate``.

What ``docs/hyperparameters.md`` chose by hand for the default model, derived the same way for
any supported model:

1. **Which blocks.** C0 of every block in the model's first half, at a few tens of thousands of
   tokens; windows of ``WIDTH`` consecutive blocks are ranked by their worst condition number
   (an ill-conditioned C0 makes the solve amplify noise, and the blocks next to the embedding
   are the worst). The best-conditioned windows (up to ``CANDIDATES``, each within
   ``CONDITION_SPREAD`` of the best one's worst block) are then tried: the built-in facts
   (``editing/data/calibration_facts.json``), applied one at a time with the method, scored
   against the unedited model, with the held-out perplexity ratio. The best Score among windows
   that keep the neighbourhood within ``MAX_NEIGHBOURHOOD_DROP`` and perplexity under
   ``MAX_PERPLEXITY_RATIO`` wins; a tie goes to the better-conditioned window.
2. **lambda** (the weight methods' C0 weight): one edit with key k writes about a/(1+a) of its
   residual, a = k^T C0^-1 k / lambda; lambda = the facts' median k^T C0^-1 k at the window's last
   block over ``LAMBDA_DIVISOR``, so that block writes a little over half, rounded to 1, 1.5, 2, 3
   or 5 times a power of ten.
3. **z* steps**: the sweep allows twice the reference 25; the calibration keeps 25 unless more
   than one fact in ten needed more, and then the steps nine in ten needed, rounded up to 5.

The result is a JSON file named by the model's fingerprint, in the cache (``calibration/``);
the models editserve names by alias also ship theirs (``editing/calibrations/``). ``serve``,
``eval`` and ``demo`` take their blocks, lambda and steps from it unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from editing import corpus, metrics
from editing.adapters import adapter_for
from editing.covariance import covariance
from editing.editor import Editor
from editing.facts import Fact, load_facts
from editing.files import write_atomically
from editing.hparams import EditHparams
from editing.models import LoadedModel

FORMAT = 1
WIDTH = 5  # MEMIT's five blocks; the window moves, its width does not
CANDIDATES = 3
CONDITION_SPREAD = 10.0
TOKENS = 40_000
MAX_NEIGHBOURHOOD_DROP = 0.03
MAX_PERPLEXITY_RATIO = 1.05
LAMBDA_DIVISOR = 1.3
MIN_STEPS = 25
FACTS = Path(__file__).parent / "data" / "calibration_facts.json"
BUILT_IN = Path(__file__).parent / "calibrations"


class NotCalibratedError(ValueError):
    """The model has no calibration and its blocks were not given: the message names the
    command that makes one."""

    def __init__(self, model: str, fingerprint: str) -> None:
        super().__init__(
            f"model {model} (fingerprint {fingerprint}) has no calibration: run "
            f"`editserve calibrate --model {model}` once (it measures which blocks to edit, "
            "lambda and the z* steps), or give the edited blocks yourself (--layers / "
            "EDITSERVE_LAYERS)"
        )


@dataclass(frozen=True)
class Calibration:
    """The settings chosen for one model, and what they were chosen from (``evidence``)."""

    model: str
    fingerprint: str
    layers: tuple[int, ...]
    mom2_lambda: float
    v_steps: int
    evidence: dict[str, Any] = field(default_factory=dict, compare=False)

    def hparams(self, base: EditHparams | None = None) -> EditHparams:
        """``base`` (the defaults) with this model's blocks, lambda and z* steps."""
        return (base or EditHparams()).with_(
            layers=self.layers, mom2_lambda=self.mom2_lambda, v_steps=self.v_steps
        )

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def read(cls, path: Path) -> Calibration:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: calibration format {raw.get('format')}, not {FORMAT}")
        return cls(
            model=raw["model"],
            fingerprint=raw["fingerprint"],
            layers=tuple(raw["layers"]),
            mom2_lambda=float(raw["mom2_lambda"]),
            v_steps=int(raw["v_steps"]),
            evidence=raw.get("evidence", {}),
        )


def calibration_key(lm: LoadedModel) -> str:
    """A short digest naming the model whatever dtype it was loaded in: its spec, its config and
    a sample of its weights rounded to bfloat16 (a calibration holds for every dtype)."""
    h = hashlib.sha256(lm.spec.encode())
    config = {k: v for k, v in lm.model.config.to_dict().items() if not k.startswith("_")}
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    h.update(repr(sorted(config.items())).encode())
    first = next(lm.model.parameters()).detach().flatten()[:4096].cpu()
    h.update(first.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def calibration_path(cache_dir: Path, fingerprint: str) -> Path:
    return cache_dir / "calibration" / f"{fingerprint}.json"


def find_calibration(lm: LoadedModel, cache_dir: Path | None) -> Calibration | None:
    """The model's calibration: the cache's own first, then the one shipped with editserve."""
    fingerprint = calibration_key(lm)
    places = [calibration_path(cache_dir, fingerprint)] if cache_dir is not None else []
    for path in [*places, BUILT_IN / f"{fingerprint}.json"]:
        if path.exists():
            return Calibration.read(path)
    return None


def nice(value: float) -> float:
    """``value`` rounded (in log scale) to 1, 1.5, 2, 3 or 5 times a power of ten."""
    power = 10.0 ** math.floor(math.log10(value))
    steps = [1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
    best = min(steps, key=lambda s: abs(math.log(value / (s * power))))
    return best * power


def windows(conditions: dict[int, float], width: int = WIDTH) -> list[tuple[int, ...]]:
    """Every run of ``width`` consecutive blocks of ``conditions``, best-conditioned first (by
    the worst block in it; ties to the earlier window)."""
    blocks = sorted(conditions)
    runs = [
        tuple(range(start, start + width))
        for start in blocks
        if all(b in conditions for b in range(start, start + width))
    ]
    return sorted(runs, key=lambda run: (max(conditions[b] for b in run), run[0]))


def calibrate(
    lm: LoadedModel,
    *,
    method: str,
    cache_dir: Path | None,
    corpus_source: str = corpus.WIKI,
    facts: list[Fact] | None = None,
    tokens: int = TOKENS,
    candidates: int = CANDIDATES,
    heldout_tokens: int = 4096,
    blocks: list[int] | None = None,
    max_steps: int = 2 * MIN_STEPS,
    say: Callable[[str], None] = print,
) -> Calibration:
    """Measure ``lm`` and choose its blocks, lambda and z* steps for ``method`` (module doc):
    ``blocks`` narrows the blocks measured (all of the first half by default), ``max_steps``
    the sweep's z* steps. The model's weights are as they were when this returns."""
    facts = facts if facts is not None else load_facts(FACTS)
    n_blocks = adapter_for(lm.model).num_layers(lm.model)
    blocks = blocks or list(range(1, max(WIDTH + 1, n_blocks // 2)))
    say(
        f"measuring C0's conditioning at blocks {blocks[0]}-{blocks[-1]} of {n_blocks} "
        f"({tokens:,} tokens of {corpus_source})"
    )
    started = time.perf_counter()
    conditions: dict[int, float] = {}
    c0: dict[int, torch.Tensor] = {}
    for group in [blocks[i : i + 4] for i in range(0, len(blocks), 4)]:  # bounds the memory
        found = covariance(lm, group, source=corpus_source, n_tokens=tokens, cache_dir=cache_dir)
        for block, matrix in found.items():
            eig = torch.linalg.eigvalsh(matrix.double())
            conditions[block] = float(eig[-1] / eig[0].clamp_min(eig[-1] * 1e-15))
            c0[block] = matrix
    for block in blocks:
        say(f"  block {block:>2}: condition number {conditions[block]:,.0f}")
    ranked = windows(conditions)
    best = max(conditions[b] for b in ranked[0])
    ranked = [w for w in ranked if max(conditions[b] for b in w) <= CONDITION_SPREAD * best]
    ranked = ranked[:candidates]
    say(f"trying {', '.join(_span(w) for w in ranked)} on {len(facts)} facts with {method}")

    _, heldout = corpus.split(corpus.load_texts(corpus_source))
    before = metrics.counterfact_scores(lm, facts)
    ppl_before = metrics.perplexity(lm, heldout, heldout_tokens)
    tried: list[dict[str, Any]] = []
    for window in ranked:
        hp = EditHparams(layers=window, v_steps=max_steps)
        editor = Editor(
            lm,
            hp,
            method,
            c0={b: c0[b] for b in window},
            cache_dir=cache_dir,
            corpus_source=corpus_source,
            progress=False,
        )
        steps, keys = [], []
        for fact in facts:
            record = editor.apply([fact]).record
            steps.extend(record.stats["steps"])
            keys.append(record.keys[window[-1]][0])
        after = metrics.counterfact_scores(lm, facts)
        ratio = metrics.perplexity(lm, heldout, heldout_tokens) / ppl_before
        editor.replay([])  # back to W0 (and no memory) for the next window
        inverse = torch.linalg.inv(c0[window[-1]].double())
        spread = [float(k.double() @ inverse @ k.double()) for k in keys]
        row = {
            "layers": list(window),
            "worst_condition": max(conditions[b] for b in window),
            "efficacy": after["efficacy"],
            "paraphrase": after.get("paraphrase"),
            "neighborhood": after["neighborhood"],
            "neighborhood_before": before["neighborhood"],
            "score": after["score"],
            "perplexity_ratio": ratio,
            "median_key_spread": statistics.median(spread),
            "zstar_steps": steps,
        }
        row["eligible"] = (
            before["neighborhood"] - after["neighborhood"] <= MAX_NEIGHBOURHOOD_DROP
            and ratio <= MAX_PERPLEXITY_RATIO
        )
        tried.append(row)
        say(
            f"  {_span(window)}: Score {row['score']:.3f} (efficacy {row['efficacy']:.2f}, "
            f"neighbourhood {row['neighborhood']:.2f} of {before['neighborhood']:.2f}), "
            f"perplexity {ratio:.3f}x{'' if row['eligible'] else ' (outside the limits)'}"
        )
    eligible = [row for row in tried if row["eligible"]] or tried
    chosen = max(eligible, key=lambda row: row["score"])  # max keeps the first of equals
    layers = tuple(chosen["layers"])
    mom2_lambda = nice(chosen["median_key_spread"] / LAMBDA_DIVISOR)
    ordered = sorted(chosen["zstar_steps"])
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    v_steps = max(MIN_STEPS, 5 * math.ceil(p90 / 5))
    why = {
        "layers": (
            f"{_span(layers)}: the best Score of the {len(tried)} best-conditioned windows"
            + ("" if chosen["eligible"] else " (none kept within the limits)")
        ),
        "mom2_lambda": (
            f"median k^T C0^-1 k at block {layers[-1]} is {chosen['median_key_spread']:,.0f}; "
            f"/ {LAMBDA_DIVISOR} rounds to {mom2_lambda:g}"
        ),
        "v_steps": f"nine in ten facts converged within {p90} steps",
    }
    for name, reason in why.items():
        say(f"chose {name}: {reason}")
    return Calibration(
        model=lm.spec,
        fingerprint=calibration_key(lm),
        layers=layers,
        mom2_lambda=mom2_lambda,
        v_steps=v_steps,
        evidence={
            "method": method,
            "tokens": tokens,
            "facts": len(facts),
            "conditions": {str(b): c for b, c in conditions.items()},
            "windows": tried,
            "perplexity_before": ppl_before,
            "why": why,
            "seconds": time.perf_counter() - started,
        },
    )


def save_calibration(calibration: Calibration, cache_dir: Path) -> Path:
    path = calibration_path(cache_dir, calibration.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, calibration.to_json().encode())
    return path


def _span(layers: tuple[int, ...] | list[int]) -> str:
    return f"blocks {layers[0]}-{layers[-1]}"
