"""``editserve``: the command line.

editserve eval --facts FILE --method d4s --rect-keep 0.4 --limit N --json
editserve demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from editing.editor import Editor
from editing.evaluate import find_dataset, run_sequential
from editing.facts import Fact, load_facts
from editing.files import write_atomically
from editing.hparams import SOLVE_DTYPES, EditHparams, parse_layers
from editing.methods import DEFAULT_METHOD, METHODS
from editing.models import DEFAULT_MODEL, default_cache_dir, load_model


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
        p.add_argument("--lambda", dest="mom2_lambda", type=float, default=defaults.mom2_lambda)
        p.add_argument(
            "--layers",
            type=_layers,
            default=None,
            help="first-last edited blocks, e.g. 3-7 (default: tuned)",
        )
        p.add_argument(
            "--memory-threshold",
            type=float,
            default=None,
            help="the keyed memory's match cosine; 0: no memory (default: the method's own)",
        )
        p.add_argument("--clamp", type=float, default=defaults.clamp_norm_factor)
        p.add_argument("--steps", type=int, default=defaults.v_steps)
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
    return parser, sub


def _layers(text: str) -> tuple[int, ...]:
    try:
        return parse_layers(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hparams(args: argparse.Namespace) -> EditHparams:
    changes: dict[str, object] = {
        "rect_keep": args.rect_keep,
        "mom2_lambda": args.mom2_lambda,
        "clamp_norm_factor": args.clamp,
        "v_steps": args.steps,
        "solve_dtype": args.solve_dtype,
        "memory_threshold": args.memory_threshold,
    }
    if args.layers:
        changes["layers"] = args.layers
    return EditHparams().with_(**changes)


def _editor(args: argparse.Namespace) -> Editor:
    lm = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    extra = {} if args.covariance_tokens is None else {"covariance_tokens": args.covariance_tokens}
    return Editor(
        lm,
        _hparams(args),
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


COMMANDS = {"eval": _eval, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser()[0].parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
