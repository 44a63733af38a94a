"""``editserve edits add|import|list|show|revert|wait|export`` and ``editserve generate``: the
API from a shell, through ``service.client``.

``import FILE`` reads CounterFact or zsRE JSON (EasyEdit's formats), JSON lines (each a
``POST /edits`` body, as ``edits export`` writes them) or CSV (a header naming ``subject``,
``prompt``, ``target_new`` and optionally ``ground_truth`` and ``reason``). The whole file is
read and checked before anything is sent; each edit's Idempotency-Key is a digest of its
content, so importing the same file again adds nothing.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from service.client import DEFAULT_URL, ApiError, Client

_FACT_FIELDS = ("subject", "prompt", "target_new", "ground_truth")


class ImportFileError(ValueError):
    """A line of an import file is not an edit: the message names the line."""


def add_commands(sub: Any) -> None:
    edits = sub.add_parser("edits", help="add, import, list, show, revert and export edits")
    verbs = edits.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help_text)
        _connection(p)
        return p

    add = verb("add", "queue one fact")
    for name in ("subject", "prompt", "target-new"):
        add.add_argument(f"--{name}", required=True)
    add.add_argument("--ground-truth")
    add.add_argument("--reason")
    add.add_argument("--wait", action="store_true", help="wait until it is settled")
    imp = verb("import", "queue every edit of a file (CounterFact JSON, JSON lines or CSV)")
    imp.add_argument("file", type=Path)
    imp.add_argument("--reason", help="for the edits that do not give their own")
    listing = verb("list", "edits, newest first")
    for name in ("status", "subject", "submitted-by", "since", "until"):
        listing.add_argument(f"--{name}")
    listing.add_argument("--limit", type=int, default=50)
    for name, text in (("show", "one edit"), ("wait", "wait until an edit is settled")):
        verb(name, text).add_argument("id")
    revert = verb("revert", "undo an edit")
    revert.add_argument("id")
    revert.add_argument("--reason")
    verb("export", "the active edits as JSON lines (what import takes back)")

    gen = sub.add_parser("generate", help="generate from the served model")
    _connection(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=32)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("EDITSERVE_URL", DEFAULT_URL))
    p.add_argument("--key", default=os.environ.get("EDITSERVE_KEY"), help="or EDITSERVE_KEY")


def run_edits(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, args.key) as client:
            return _VERBS[args.verb](client, args)
    except ApiError as exc:
        print(f"editserve edits {args.verb}: {exc}", file=sys.stderr)
        return 1
    except (ImportFileError, OSError) as exc:
        print(f"editserve edits {args.verb}: {exc}", file=sys.stderr)
        return 2


def run_generate(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, args.key) as client:
            out = client.generate(args.prompt, args.max_new_tokens)
    except ApiError as exc:
        print(f"editserve generate: {exc}", file=sys.stderr)
        return 1
    print(args.prompt + out["generated_text"])
    return 0


def _show(edit: dict[str, Any]) -> int:
    print(json.dumps(edit, indent=1))
    return 0


def _add(client: Client, args: argparse.Namespace) -> int:
    fact = {"subject": args.subject, "prompt": args.prompt, "target_new": args.target_new}
    if args.ground_truth:
        fact["ground_truth"] = args.ground_truth
    accepted = client.add(fact, reason=args.reason)
    return _show(client.wait(accepted["id"]) if args.wait else accepted)


def _import(client: Client, args: argparse.Namespace) -> int:
    bodies = read_import(args.file)
    added = 0
    for body in tqdm(bodies, desc=f"importing {args.file.name}", unit="edit"):
        if args.reason and "reason" not in body:
            body = {**body, "reason": args.reason}
        key = "import-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        facts = body.get("facts")
        reason = body.get("reason")
        plain = {k: v for k, v in body.items() if k != "reason"}
        if facts is not None:
            accepted = client.add_batch(facts, reason, key)
        else:
            accepted = client.add(plain, reason, key)
        added += not accepted.get("replayed", False)
    print(f"{len(bodies)} edits in {args.file}: {added} new, {len(bodies) - added} known already")
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    filters = {
        "status": args.status,
        "subject": args.subject,
        "submitted_by": args.submitted_by,
        "since": args.since,
        "until": args.until,
    }
    for i, edit in enumerate(client.edits(**filters)):
        if i == args.limit:
            break
        fact = edit["facts"][0]
        more = f" (+{len(edit['facts']) - 1})" if len(edit["facts"]) > 1 else ""
        print(
            f"{edit['id']}  {edit['status']:<10} {edit.get('submitted_by') or '-':<12} "
            f"{fact['subject']}: {fact['target_new']}{more}"
        )
    return 0


def _export(client: Client, args: argparse.Namespace) -> int:
    for line in client.export_edits():
        print(json.dumps(line))
    return 0


_VERBS = {
    "add": _add,
    "import": _import,
    "list": _list,
    "show": lambda client, args: _show(client.get(args.id)),
    "wait": lambda client, args: _show(client.wait(args.id)),
    "revert": lambda client, args: _show(client.revert(args.id, args.reason)),
    "export": _export,
}


def read_import(path: Path) -> list[dict[str, Any]]:
    """``POST /edits`` bodies from an import file, each checked as the server checks it
    (``ImportFileError`` names the first line that is not an edit)."""
    from editing.facts import load_facts
    from service.schemas import BatchIn, FactEditIn

    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        bodies = [{k: v for k, v in row.items() if v} for row in rows]
        numbered = list(enumerate(bodies, start=2))  # line 1 is the header
    elif path.suffix == ".jsonl":
        numbered = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise ImportFileError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(doc, dict):
                raise ImportFileError(f"{path}:{n}: not an object")
            numbered.append((n, {k: v for k, v in doc.items() if k != "edit"}))
    else:
        try:
            facts = load_facts(path)
        except (ValueError, KeyError, TypeError) as exc:
            raise ImportFileError(f"{path}: not CounterFact or zsRE JSON ({exc})") from None
        numbered = [(i + 1, _body(fact)) for i, fact in enumerate(facts)]
    for n, body in numbered:
        try:
            (BatchIn if "facts" in body else FactEditIn).model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ImportFileError(f"{path}:{n}: {where}: {first['msg']}") from None
    return [body for _, body in numbered]


def _body(fact: Any) -> dict[str, Any]:
    body = {name: getattr(fact, name) for name in _FACT_FIELDS if getattr(fact, name)}
    if fact.paraphrases:
        body["paraphrases"] = list(fact.paraphrases)
    if fact.locality:
        body["locality"] = [
            {"prompt": loc.prompt, **({"answer": loc.answer} if loc.answer else {})}
            for loc in fact.locality
        ]
    return body
