"""Speed figures of a randomly initialised model of a large model's shape, in one process.

The values of the weights do not change how fast a model runs, so a random model of Llama-3-8B's
shape times what editserve does with Llama-3-8B on the same hardware, without its weights (no
hub is reachable here). Everything runs in this process on the model's device, through the
engine (``editing.editor.Editor``, D4S with RECT) and the server's batcher (``service.generation``):

- covariance: C0 of the edited layers over ``--covariance-tokens`` tokens, tokens/s;
- edits: one edit, warm, by phase (keys and z*, solve, swap); z* for 16 facts in one batch;
- solves: a revert (plan and swap) with 3 edits active, and with ``--active`` active (synthetic
  records of a real edit's shapes, values random: past ``LOW_RANK_ROWS`` rows, so the full
  ``in x in`` solve); the replay of those ``--active`` records;
- generation: the batcher's single stream against transformers ``generate`` (greedy, the same
  prompts, interleaved rounds), and the batcher with 4 and 8 requests at once over its single
  stream;
- memory: peak device memory, and the D4S state's bytes.

Every figure is labelled with its hardware. On a lent GPU (the tokenizer travels in a folder of
its own: ``--save-tokenizer DIR`` here writes SmolLM2's):

    python bench/shape_bench.py --shape llama3-8b --device cuda --tokenizer DIR \\
        --out bench/results/gpu-llama3-8b-shape.json

``--shape tiny`` runs the same code at toy size on the CPU in seconds (the tests do).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from serve_bench import PROMPTS
from speed import hardware, submit_together
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from editing.covariance import covariance
from editing.d4s import LOW_RANK_ROWS
from editing.editor import Editor
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import DEFAULT_MODEL, LoadedModel, default_cache_dir
from editing.records import DeltaRecord
from service.generation import Batcher

#: name -> (config, edited blocks). Llama-3-8B: 32 blocks, hidden 4096, MLP 14336, grouped-query
#: attention (32 heads, 8 for keys and values), a 128,256-token vocabulary; edited blocks 4-8, as
#: the MEMIT family does on Llama-2-7B (docs/algorithms.md, section 1).
SHAPES: dict[str, tuple[LlamaConfig, tuple[int, ...]]] = {
    "llama3-8b": (
        LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        (4, 5, 6, 7, 8),
    ),
    "tiny": (
        LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
        (1, 2),
    ),
}

FACTS = [
    Fact(f"Subject {i}", f"The home city of Subject {i} is", " Paris", " Rome") for i in range(17)
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer's folder")
    parser.add_argument("--save-tokenizer", type=Path, default=None, help="write it; exit")
    parser.add_argument("--covariance-tokens", type=int, default=20_000)
    parser.add_argument("--active", type=int, default=1000, help="edits active for the solves")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--v-steps", type=int, default=EditHparams.v_steps)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tokenizer_dir = args.tokenizer or default_cache_dir() / "models" / DEFAULT_MODEL
    if not (tokenizer_dir / "tokenizer.json").exists():
        print(f"no tokenizer at {tokenizer_dir}: give --tokenizer DIR", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if args.save_tokenizer is not None:
        tokenizer.save_pretrained(args.save_tokenizer)
        return 0
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device != "cpu" else "float32"))
    config, layers = SHAPES[args.shape]
    device = torch.device(args.device)
    started = time.perf_counter()
    with device:  # initialised where it runs: an 8B model's random init on a CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    lm = LoadedModel(spec=f"random {args.shape}", model=model, tokenizer=tokenizer)
    result: dict[str, Any] = {
        "hardware": hardware(),
        "device": str(device),
        "shape": args.shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "edited_layers": list(layers),
        "model_init_seconds": time.perf_counter() - started,
    }
    sync = _synchronizer(device)
    hp = EditHparams(layers=layers, v_steps=args.v_steps)
    result["covariance"], c0 = _covariance(lm, hp, args.covariance_tokens, sync)
    editor = Editor(lm, hp, "d4s", c0=c0)
    result["edits"] = _edits(editor, sync)
    result["solves"] = _solves(editor, args.active, sync)
    del editor, c0
    result["generation"] = _generation(lm, args.new_tokens, sync)
    if device.type == "cuda":
        result["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed(sync: Callable[[], None], work: Callable[[], Any]) -> tuple[Any, float]:
    sync()
    start = time.perf_counter()
    out = work()
    sync()
    return out, time.perf_counter() - start


def _covariance(
    lm: LoadedModel, hp: EditHparams, tokens: int, sync: Callable[[], None]
) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """C0 over text of random tokens (what C0 holds does not change its cost)."""
    generator = torch.Generator().manual_seed(0)
    vocab = len(lm.tokenizer)
    texts = [
        lm.tokenizer.decode(torch.randint(vocab, (256,), generator=generator))
        for _ in range(tokens // 200 + 8)
    ]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "texts.json"
        source.write_text(json.dumps(texts))
        c0, seconds = _timed(
            sync,
            lambda: covariance(lm, hp.layers, source=str(source), n_tokens=tokens, progress=False),
        )
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}, c0


def _edits(editor: Editor, sync: Callable[[], None]) -> dict[str, Any]:
    editor.apply([FACTS[0]])  # warm
    result, total = _timed(sync, lambda: editor.apply([FACTS[1]]))
    _, batch = _timed(sync, lambda: editor.compute_many([[f] for f in FACTS[1:17]]))
    return {
        "one_edit_seconds": total,
        "phase_seconds": result.seconds,
        "zstar_steps": result.record.stats.get("steps"),
        "batch_of_16_zstar_seconds_per_fact": batch / 16,
    }


def _solves(editor: Editor, active: int, sync: Callable[[], None]) -> dict[str, Any]:
    """Reverts and a replay: the solves that need no z*."""
    template = editor.records[-1]
    editor.apply([FACTS[2]])  # three active
    out: dict[str, Any] = {}
    _, out["revert_seconds_3_active"] = _timed(sync, lambda: editor.revert(template.id))
    generator = torch.Generator().manual_seed(0)

    def like(x: torch.Tensor) -> torch.Tensor:
        """Random values of ``x``'s shape and root mean square (so the exact sums' room holds)."""
        rms = float(x.float().pow(2).mean().sqrt())
        return (torch.randn(x.shape, generator=generator) * rms).to(x)

    records = [
        DeltaRecord(
            id=f"synthetic-{i}",
            facts=(dataclasses.replace(FACTS[0], subject=f"S{i}", prompt=f"S{i} lives in"),),
            keys={layer: like(k) for layer, k in template.keys.items()},
            residual=like(template.residual),
        )
        for i in range(active)
    ]
    _, out["replay_seconds"] = _timed(sync, lambda: editor.replay(records))
    out["active"] = len(editor.records)
    out["full_solve"] = active > LOW_RANK_ROWS
    _, out["revert_seconds_oldest"] = _timed(sync, lambda: editor.revert(records[0].id))
    _, out["revert_seconds_newest"] = _timed(sync, lambda: editor.revert(records[-1].id))
    out["active_after_reverts"] = len(editor.records)
    out["d4s_state_bytes"] = editor.state_bytes()
    return out


def _generation(lm: LoadedModel, n: int, sync: Callable[[], None]) -> dict[str, Any]:
    """The batcher's tokens/s alone and with 4 and 8 requests at once, and transformers
    ``generate`` one prompt at a time, greedy, in interleaved rounds."""
    batcher = Batcher(lm, contextlib.nullcontext(), lambda: 0)
    batcher.start()

    def together(prompts: list[str]) -> tuple[int, float]:
        return submit_together(batcher, lm, prompts, n)

    def plain(prompt: str) -> tuple[int, float]:
        enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return lm.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        out, seconds = _timed(sync, run)
        return int(out.shape[1] - enc["input_ids"].shape[1]), seconds

    def rate(runs: list[tuple[int, float]]) -> float:
        return sum(t for t, _ in runs) / sum(s for _, s in runs)

    try:
        together(PROMPTS[:1])  # warm both paths
        plain(PROMPTS[0])
        singles, plains = [], []
        for _ in range(2):
            singles.append(rate([together([p]) for p in PROMPTS]))
            plains.append(rate([plain(p) for p in PROMPTS]))
        single, baseline = statistics.median(singles), statistics.median(plains)
        at_once = {k: rate([together(PROMPTS[:k])]) for k in (4, 8)}
    finally:
        batcher.stop()
    return {
        "new_tokens": n,
        "batcher_single_stream_tokens_per_s": single,
        "transformers_generate_tokens_per_s": baseline,
        "single_stream_over_transformers": single / baseline,
        "batcher_at_once_tokens_per_s": {str(k): v for k, v in at_once.items()},
        "at_once_over_single_stream": {str(k): v / single for k, v in at_once.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
