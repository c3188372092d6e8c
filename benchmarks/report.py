"""Shared output of the benchmark scripts: print a markdown table and optionally write it."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], out: str | None) -> str:
    """Print the table lines and write them to `out` (when given); returns the text.

    Args:
        lines: the table (and any header lines) as markdown lines.
        out: file to write, or None.
    """
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return text
