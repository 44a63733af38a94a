"""Write docs/configuration.md's table from ``service/settings.py``: every setting with its
environment variable, its ``editserve serve`` flag, its default and its meaning (the field's
description), between the lines ``<!-- settings-table:begin -->`` and
``<!-- settings-table:end -->``. ``tests/service/test_settings.py`` fails when the table is stale.

    python scripts/build_settings_table.py [docs/configuration.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

from service.settings import Settings, env_var, flag, shown_default

TARGET = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN = "<!-- settings-table:begin -->"
END = "<!-- settings-table:end -->"


def render() -> str:
    """The table, one row per setting in the order ``Settings`` declares them."""
    rows = [
        "| Variable | Flag | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        option = flag(name)
        default = shown_default(name)
        cells = [
            f"`{env_var(name)}`",
            f"`{option}`" if option else "none: environment only",
            "unset" if default == "unset" else f"`{default}`",
            _cell(field.description or ""),
        ]
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def rewrite(text: str) -> str:
    """``text`` with what lies between the marker lines replaced by the table."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"want one {BEGIN} line, then one {END} line")
    return "".join([*lines[: starts[0] + 1], render(), *lines[ends[0] :]])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the cell


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else TARGET
    try:
        path.write_text(rewrite(path.read_text()))
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the settings table in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
