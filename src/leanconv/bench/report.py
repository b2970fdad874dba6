"""Writing results: JSON (header, configuration, rows), CSV, a Markdown table
and an optional plot, each written to a temporary file and renamed, so a
reader never sees half a file."""

from __future__ import annotations

import csv
import io
import json
from typing import Sequence

from ..files import write_atomic

__all__ = ["write_results", "markdown_table", "read_results"]


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    return buffer.getvalue()


def write_results(
    stem: str,
    *,
    header: dict,
    config: dict,
    rows: Sequence[dict],
    columns: Sequence[str],
    title: str,
    notes: Sequence[str] = (),
    plot=None,
) -> list[str]:
    """Write ``stem``.json, .csv and .md (and .png when ``plot(file)`` is given
    and matplotlib is installed; it writes PNG bytes to the binary file object). Returns the paths written."""
    payload = {"title": title, "environment": header, "config": config, "notes": list(notes), "rows": list(rows)}
    paths = []
    write_atomic(stem + ".json", json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
    paths.append(stem + ".json")
    write_atomic(stem + ".csv", _csv(rows, columns))
    paths.append(stem + ".csv")
    env = ", ".join(f"{k}={v}" for k, v in header.items())
    text = f"# {title}\n\n{env}\n\nconfig: {json.dumps(config, default=str)}\n\n"
    text += "".join(f"- {note}\n" for note in notes) + ("\n" if notes else "")
    text += markdown_table(rows, columns)
    write_atomic(stem + ".md", text)
    paths.append(stem + ".md")
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            return paths
        write_atomic(stem + ".png", plot)
        paths.append(stem + ".png")
    return paths


def read_results(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)
