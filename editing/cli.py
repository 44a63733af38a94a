"""``editserve``: the command line.

editserve eval --facts FILE --method d4s --rect-keep 0.4 --limit N --json
editserve demo
editserve calibrate --model NAME   (a model's blocks, lambda and z* steps)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from editing import calibrate as calibrate_mod
from editing.calibrate import Calibration, NotCalibratedError, calibration_key, find_calibration
from editing.editor import Editor
from editing.evaluate import find_dataset, run_sequential
from editing.facts import Fact, load_facts
from editing.files import write_atomically
from editing.hparams import SOLVE_DTYPES, EditHparams, parse_layers
from editing.methods import DEFAULT_METHOD, METHODS
from editing.models import DEFAULT_MODEL, LoadedModel, default_cache_dir, load_model


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser and its sub-command set, to which the server adds ``serve``."""
    parser = argparse.ArgumentParser(prog="editserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        defaults = EditHparams()
        p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local directory or hub id")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
        p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
        p.add_argument("--rect-keep", type=float, default=defaults.rect_keep)
        p.add_argument(
            "--lambda",
            dest="mom2_lambda",
            type=float,
            default=None,
            help="C0's weight in the weight methods' solve (default: the model's calibration)",
        )
        p.add_argument(
            "--layers",
            type=_layers,
            default=None,
            help="first-last edited blocks, e.g. 3-7 (default: the model's calibration)",
        )
        p.add_argument(
            "--memory-threshold",
            type=float,
            default=None,
            help="the keyed memory's match cosine; 0: no memory (default: the method's own)",
        )
        p.add_argument("--clamp", type=float, default=defaults.clamp_norm_factor)
        p.add_argument(
            "--steps", type=int, default=None, help="z* steps (default: the model's calibration)"
        )
        p.add_argument(
            "--solve-dtype",
            choices=SOLVE_DTYPES,
            default=defaults.solve_dtype,
            help="d4s's full solve past 256 key rows: float64, or float32, faster at the weights' "
            "precision",
        )
        p.add_argument("--covariance-tokens", type=int, default=None)
        p.add_argument(
            "--corpus", default="wiki", help="covariance text: wiki, a .txt/.json file, hf:NAME"
        )

    ev = sub.add_parser("eval", help="apply facts one by one, then evaluate")
    common(ev)
    ev.add_argument(
        "--facts", type=Path, default=None, help="CounterFact or zsRE file (EasyEdit format)"
    )
    ev.add_argument("--limit", type=int, default=100)
    ev.add_argument("--batch-size", type=int, default=1, help="facts per edit step")
    ev.add_argument(
        "--record-cache",
        type=Path,
        default=None,
        help="a folder to reuse W0-only z* records and the unedited model's measurements from",
    )
    ev.add_argument("--heldout-tokens", type=int, default=8192, help="tokens for perplexity")
    ev.add_argument("--fluency-prompts", type=int, default=20)
    ev.add_argument(
        "--checkpoints",
        default="",
        help="also evaluate after these numbers of edits, e.g. 10,100,500 (comma-separated)",
    )
    ev.add_argument(
        "--zstar-batch",
        type=int,
        default=1,
        help="with --record-cache: steps per batched z* optimisation when filling the cache",
    )
    ev.add_argument(
        "--out", type=Path, default=None, help="write the JSON here, rewritten at each checkpoint"
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    demo = sub.add_parser("demo", help="edit one fact, generate, revert, generate")
    common(demo)

    cal = sub.add_parser(
        "calibrate",
        help="measure a model and choose its edited blocks, lambda and z* steps",
        description="Measure the model (C0's conditioning per block, a short sweep of the "
        "best-conditioned windows on built-in facts, the keys' statistics) and write the "
        "settings it chose, and why, to the cache, keyed by the model's fingerprint. serve, "
        "eval and demo use them.",
    )
    cal.add_argument("--model", default=DEFAULT_MODEL, help="alias, local directory or hub id")
    cal.add_argument("--device", default="auto")
    cal.add_argument("--dtype", default="auto")
    cal.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    cal.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
    cal.add_argument("--corpus", default="wiki", help="text for C0: wiki, a .txt/.json file")
    cal.add_argument("--tokens", type=int, default=calibrate_mod.TOKENS, help="C0 tokens per block")
    cal.add_argument(
        "--candidates",
        type=int,
        default=calibrate_mod.CANDIDATES,
        help="how many of the best-conditioned windows the sweep tries",
    )
    cal.add_argument(
        "--facts",
        type=Path,
        default=calibrate_mod.FACTS,
        help="the sweep's facts (default: editserve's built-in set)",
    )
    cal.add_argument("--limit", type=int, default=None, help="use only the first N facts")
    cal.add_argument(
        "--out", type=Path, default=None, help="write here instead of the cache's calibration/"
    )
    return parser, sub


def _layers(text: str) -> tuple[int, ...]:
    try:
        return parse_layers(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hparams(args: argparse.Namespace, calibration: Calibration | None = None) -> EditHparams:
    """The flags given, over the model's calibration, over the defaults."""
    changes: dict[str, object] = {
        "rect_keep": args.rect_keep,
        "clamp_norm_factor": args.clamp,
        "solve_dtype": args.solve_dtype,
        "memory_threshold": args.memory_threshold,
    }
    given = {"layers": args.layers, "mom2_lambda": args.mom2_lambda, "v_steps": args.steps}
    changes.update({name: value for name, value in given.items() if value is not None})
    base = calibration.hparams() if calibration is not None else EditHparams()
    return base.with_(**changes)


def _editor(args: argparse.Namespace) -> Editor:
    lm = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    calibration = find_calibration(lm, args.cache_dir)
    if calibration is None and args.layers is None:
        raise NotCalibratedError(args.model, calibration_key(lm))
    extra = {} if args.covariance_tokens is None else {"covariance_tokens": args.covariance_tokens}
    return Editor(
        lm,
        _hparams(args, calibration),
        args.method,
        cache_dir=args.cache_dir,
        corpus_source=args.corpus,
        **extra,
    )


def _eval(args: argparse.Namespace) -> int:
    try:
        path = args.facts or find_dataset("counterfact", "counterfact-train.json")
    except FileNotFoundError as exc:
        print(f"editserve eval: {exc}", file=sys.stderr)
        return 2
    facts = load_facts(path, args.limit)
    try:
        checkpoints = [int(n) for n in args.checkpoints.split(",") if n.strip()]
    except ValueError:
        print(f"editserve eval: --checkpoints {args.checkpoints!r} is not a list of numbers")
        return 2
    editor = _editor(args)
    done: list[dict] = []

    def save(result: dict) -> None:
        done.append({**result, "facts_file": str(path)})
        if args.out is not None:
            write_atomically(args.out, json.dumps({**done[-1], "checkpoints": done}).encode())

    result = run_sequential(
        editor,
        facts,
        batch_size=args.batch_size,
        checkpoints=checkpoints,
        record_cache=args.record_cache,
        zstar_batch=args.zstar_batch,
        heldout_tokens=args.heldout_tokens,
        fluency_prompts=args.fluency_prompts,
        on_checkpoint=save,
    )
    result["facts_file"] = str(path)
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("n_edits", "method", "efficacy", "paraphrase", "neighborhood", "score"):
            print(f"{key:>20}: {result[key]}")
        print(
            f"{'perplexity':>20}: {result['perplexity_before']:.2f} -> "
            f"{result['perplexity_after']:.2f}"
        )
        print(f"{'seconds_per_edit':>20}: {result['seconds_per_edit']:.2f}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    editor = _editor(args)
    lm = editor.lm
    fact = Fact(
        subject="Eiffel Tower",
        prompt="The Eiffel Tower is located in the city of",
        target_new="Rome",
        ground_truth="Paris",
    )

    def say(label: str) -> None:
        enc = lm.tokenizer(fact.prompt, return_tensors="pt").to(lm.device)
        out = lm.generate(**enc, max_new_tokens=8, do_sample=False)
        text = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"{label:>8}: {fact.prompt}{text}")

    say("before")
    result = editor.apply([fact])
    print(f"applied edit {result.record.id} in {sum(result.seconds.values()):.1f} s")
    say("edited")
    editor.revert(result.record.id)
    say("reverted")
    return 0


def calibrate_command(
    args: argparse.Namespace,
    then: Callable[[LoadedModel, Calibration, Callable[[str], None]], None] | None = None,
) -> int:
    """``editserve calibrate``; ``then(lm, calibration, say)`` measures more with the model loaded
    (the server adds its probes' baseline)."""
    lm = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    found = calibrate_mod.calibrate(
        lm,
        method=args.method,
        cache_dir=args.cache_dir,
        corpus_source=args.corpus,
        facts=load_facts(args.facts, args.limit),
        tokens=args.tokens,
        candidates=args.candidates,
        say=lambda line: print(line, flush=True),
    )
    if then is not None:
        then(lm, found, lambda line: print(line, flush=True))
    if args.out is not None:
        write_atomically(args.out, found.to_json().encode())
        path = args.out
    else:
        path = calibrate_mod.save_calibration(found, args.cache_dir)
    print(
        f"calibrated {args.model}: blocks {found.layers[0]}-{found.layers[-1]}, lambda "
        f"{found.mom2_lambda:g}, {found.v_steps} z* steps; wrote {path}"
    )
    return 0


COMMANDS = {"eval": _eval, "demo": _demo, "calibrate": calibrate_command}


def run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)``, with a model that needs calibrating told so in one line."""
    try:
        return command(args)
    except NotCalibratedError as exc:
        print(f"editserve {args.command}: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser()[0].parse_args(argv)
    return run(COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
