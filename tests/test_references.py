"""Nothing cites what the repository lacks: every module that a docstring names (with the
``:mod:`` role, or a backquoted dotted name under ``service`` or ``editing``) can be imported,
and every repository path cited in code, Markdown, the Makefile, docker/ and deploy/ exists. A
failure lists each dangling reference as file:line."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Folders whose paths the repository's own text cites; a path cited under one of them must exist.
TOP = r"editing|service|tests|bench|scripts|docs|deploy|docker|\.ci"
# A path under a top folder, not itself part of a longer path, URL or absolute path.
REPO_PATH = re.compile(rf"(?<![\w./~$-])((?:{TOP})/[\w.@+-]*(?:/[\w.@+-]+)*/?)")
# A Markdown file at the top of the repository, written in capitals (README.md, say).
TOP_DOC = re.compile(r"(?<![\w./~$-])([A-Z][A-Z0-9_-]*\.md)\b")
# A Markdown link's target.
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
MOD_ROLE = re.compile(r":mod:`~?([\w.]+)`")
DOTTED = re.compile(r"``?((?:service|editing)(?:\.\w+)+)``?")
# Where the benchmarks write: code and the Makefile may name an output that no run has kept yet.
# Markdown cites results as evidence, so there they must exist.
OUTPUTS = "bench/results/"


def tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def cited_in(path: Path) -> bool:
    if path == Path(__file__).resolve():
        return False  # its examples of dangling citations are meant to dangle
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith(("bench/results/", "tests/deploy/schemas/", "tests/data/")):
        return False  # measurements, third-party schemas and data: not prose or code
    return (
        path.suffix in (".py", ".md")
        or path.name == "Makefile"
        or rel.startswith(("docker/", "deploy/", ".ci/"))
    )


def path_references(path: Path) -> Iterator[tuple[int, str, Path]]:
    """(line, as written, where it points) for each repository path ``path`` cites."""
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for match in REPO_PATH.finditer(line):
            written = match.group(1).rstrip(".,:;")
            if any(c in line[match.end(1) : match.end(1) + 1] for c in "<{*$"):
                written = written.rsplit("/", 1)[0] + "/"  # a pattern: its folder must exist
            yield number, written, ROOT / written
        for match in TOP_DOC.finditer(line):
            yield number, match.group(1), ROOT / match.group(1)
        if path.suffix == ".md":
            for match in MD_LINK.finditer(line):
                target = match.group(1).split("#")[0]
                if target and "://" not in target and not target.startswith("mailto:"):
                    yield number, target, path.parent / target


def docstrings(path: Path) -> Iterator[tuple[int, str]]:
    """(first line, text) of each docstring in a Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                yield body[0].lineno, body[0].value.value


@cache
def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is a module, not a package
        return False


@cache
def top_level_names(module: str) -> frozenset[str]:
    """The names a module defines or imports at its top level, read from its source."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def resolves(dotted: str) -> bool:
    """A module, or a name defined at the top of one (``editing.d4s.solve_update``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module_exists(module):
            return cut == len(parts) or parts[cut] in top_level_names(module)
    return False


def test_every_module_a_docstring_names_exists() -> None:
    dangling = []
    for path in tracked():
        if path.suffix != ".py" or not cited_in(path):
            continue
        for first, text in docstrings(path):
            for offset, line in enumerate(text.splitlines()):
                names = MOD_ROLE.findall(line) + DOTTED.findall(line)
                for name in dict.fromkeys(names):
                    if not resolves(name):
                        where = f"{path.relative_to(ROOT)}:{first + offset}"
                        dangling.append(f"{where}: {name}")
    assert not dangling, "docstrings name modules that do not exist:\n" + "\n".join(dangling)


def test_every_repository_path_cited_exists() -> None:
    dangling = []
    for path in tracked():
        if not cited_in(path):
            continue
        for number, written, target in path_references(path):
            if target.exists() or (path.suffix != ".md" and written.startswith(OUTPUTS)):
                continue
            dangling.append(f"{path.relative_to(ROOT)}:{number}: {written}")
    assert not dangling, "cited paths the repository lacks:\n" + "\n".join(dangling)


def test_the_scanners_see_citations_and_leave_urls_and_examples(tmp_path: Path) -> None:
    """What the two tests above rely on: a dangling citation is seen, at its line; a URL, an
    absolute or example path and a template are not taken for one."""
    doc = tmp_path / "notes.md"
    doc.write_text(
        "See docs/algorithms.md, ALGORITHMS.md and [the log](gone/design.md#the-log).\n"
        "https://github.com/o/r/blob/main/docs/nope.md, /path/to/docs/nope.md, ~/docs/x.md\n"
        "Each run writes bench/results/<name>.json; the probes: `service/data/probes.jsonl`.\n"
    )
    found = {(line, written) for line, written, _ in path_references(doc)}
    assert found == {
        (1, "docs/algorithms.md"),
        (1, "ALGORITHMS.md"),
        (1, "gone/design.md"),
        (3, "bench/results/"),
        (3, "service/data/probes.jsonl"),
    }
    targets = {written: target for _, written, target in path_references(doc)}
    assert targets["gone/design.md"] == tmp_path / "gone/design.md"  # beside the Markdown
    assert resolves("service.settings") and resolves("editing.hparams.EditHparams.with_")
    assert not resolves("service.api.no_such_module")
    assert not resolves("editing.Editor")  # a package that does not export it
