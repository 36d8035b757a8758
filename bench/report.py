"""The table writer: a run's summary (each section's figures, in section order), its JSON
file (bench/runs/, which git ignores), and the Markdown table
appended to bench/RESULTS.md, every figure next to its same-run reference and the ratio,
with the target and whether it is met. Sections build their own rows with the helpers
here (`spread`, `num`, `met`) and say what they expose in `Section`.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bench.common import RESULTS_MD, ROOT, RUNS_DIR

if TYPE_CHECKING:
    from bench.harness import Bench

# One table row: figure, measured, reference, ratio, target, met.
Row = tuple[str, ...]


class Section(Protocol):
    """What a section module exposes (bench/README.md, "Adding a section")."""

    NAME: str  # what --only takes
    KEY: str  # its entry in the JSON's `details`

    def measure(self, bench: Bench) -> dict[str, Any]: ...

    def summary(self, details: dict[str, Any]) -> dict[str, float | int | None]: ...

    def rows(self, details: dict[str, Any], summary: dict[str, Any]) -> list[Row]: ...


def median_of(s: dict[str, Any] | None) -> float | None:
    return None if not s else s.get("median")


def get(d: dict[str, Any], *path: str) -> Any:
    """d[path[0]][path[1]]...; None where a key is missing (a section that did not run)."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarize(details: dict[str, Any], sections: Sequence[Section]) -> dict[str, Any]:
    """Every section's figures, None for those of a section that did not run."""
    summary: dict[str, Any] = {}
    for section in sections:
        figures = section.summary(details)
        clash = set(figures) & set(summary)
        if clash:
            raise RuntimeError(f"{section.NAME} repeats the figures {sorted(clash)}")
        summary.update(figures)
    return summary


def num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def spread(s: dict[str, Any] | None, digits: int = 0, unit: str = "") -> str:
    """`median [min-max] (n)` of a repeated measurement."""
    if not s or s.get("median") is None:
        return "n/a"
    text = f"{num(s['median'], digits)}{unit}"
    if s["n"] > 1:
        text += f" [{num(s['min'], digits)}-{num(s['max'], digits)}]"
    return text + f" (n={s['n']})"


def met(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value >= target if at_least else value <= target) else "**no**"


def table(details: dict[str, Any], summary: dict[str, Any], sections: Sequence[Section]) -> str:
    """The Markdown table: the rows of every section that ran, in section order."""
    rows: list[Row] = []
    for section in sections:
        if details.get(section.KEY):
            rows += section.rows(details, summary)
    header = (
        "Figure",
        "Measured: median [min-max] (n)",
        "Reference, same run",
        "Ratio",
        "Target",
        "Met",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def context_line(meta: dict[str, Any]) -> str:
    return (
        f"outbox {meta['outbox_version']}"
        + (f" at {meta['commit']}" if meta.get("commit") else "")
        + f", PostgreSQL {meta['postgres']} (private cluster,"
        f" fsync={meta['fsync']}, shared_buffers={meta['shared_buffers']},"
        f" synchronous_commit={meta['synchronous_commit']}), {meta['cpus']} CPUs,"
        f" load average {meta['loadavg_start']} at start / {meta['loadavg_end']} at end,"
        f" {meta['reps']} repetitions, {meta['runtime_s']:.0f} s in all."
    )


def write_results(
    stamp: str,
    meta: dict[str, Any],
    summary: dict[str, Any],
    details: dict[str, Any],
    errors: dict[str, str],
    suffix: str,
) -> Path:
    """The run's JSON, in bench/runs/ (ignored by git: RESULTS.md keeps a full run's
    figures); `suffix` marks a --quick or --only run."""
    directory = RUNS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{stamp[:10]}{suffix}"
    path = directory / f"{name}.json"
    if path.exists():
        path = directory / f"{name}-{stamp[11:].replace(':', '')}.json"
    document = {"summary": summary, "meta": meta, "details": details, "errors": errors}
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, array):
        return None  # raw per-request arrays stay out of the file
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def append_markdown(
    stamp: str, meta: dict[str, Any], text: str, errors: dict[str, str], json_path: Path
) -> None:
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(
            "# Benchmark results\n\nAppended by `make bench`, newest last; bench/README.md"
            " says what each figure is and how it is measured.\n"
        )
    notes = ""
    if errors:
        notes = "\nSections that failed: " + ", ".join(sorted(errors)) + " (see the JSON).\n"
    with RESULTS_MD.open("a") as f:
        f.write(
            f"\n## {stamp}\n\n{context_line(meta)}"
            f" Raw: `{json_path.relative_to(ROOT)}` (not committed).\n\n"
            f"{text}\n{notes}"
        )


def strip_arrays(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_arrays(v) for k, v in value.items() if not isinstance(v, array)}
    if isinstance(value, list):
        return [strip_arrays(v) for v in value]
    return value
