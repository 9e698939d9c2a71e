"""MkDocs hook: the benchmark tables of the docs, rendered from benchmarks/results/*.json at build time.

A line `<!-- benchmark: NAME -->` in a page becomes the record of benchmarks/results/NAME.json: the
machine it ran on, when, the run's notes and its table, and the plot NAME.png when the run made
one. The tables are never copied into a page, so a benchmark rerun shows in the next build with
nothing to regenerate. A marker naming no record fails the build; tests/test_docs_reference.py
checks that every record has a marker.

Each record holds its table under "table" (benchmarks/common.py `write_results`); a record written
before that key existed has its table in the Markdown file the same run wrote beside it (NAME.md),
which is read instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- benchmark: ([A-Za-z0-9_]+) -->[ \t]*$", re.MULTILINE)
PLOT_URI = "benchmarks/results/{name}.png"


def record_names() -> list[str]:
    """The name of every benchmark record (benchmarks/results/NAME.json)."""
    return sorted(path.stem for path in RESULTS_DIR.glob("*.json"))


def machine_line(record: dict[str, Any]) -> str:
    """Where and when a record was measured, in one line."""
    machine = record.get("machine", {})
    parts = []
    if record.get("device"):
        parts.append(str(record["device"]))
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} CPU cores")
    if machine.get("memory_bytes"):
        parts.append(f"{machine['memory_bytes'] / 2**30:.1f} GiB RAM")
    if record.get("torch"):
        parts.append(f"torch {record['torch']}")
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    if machine.get("platform"):
        parts.append(machine["platform"])
    when = record.get("timestamp") or record.get("created")
    load = record.get("load_average_1min_at_end")
    if load is None and isinstance(record.get("load_average_after"), list):
        load = record["load_average_after"][0]
    line = "Ran on " + (", ".join(parts) if parts else "an unrecorded machine")
    if when:
        line += f"; {when}"
    if load is not None:
        line += f"; load average {load:.1f} at the end"
    return line + "."


def _table_from_markdown(path: Path) -> dict[str, Any]:
    """title, notes, columns and rows of a results Markdown file written by `write_results`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    title = lines[0].removeprefix("# ").strip() if lines else path.stem
    notes = [line[2:] for line in lines if line.startswith("- ")]
    table = [line for line in lines if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]
    return {"title": title, "notes": notes, "columns": split[0] if split else [], "rows": split[2:]}


def table_of(name: str) -> dict[str, Any]:
    """The table of record NAME: its "table" key, else the Markdown file the same run wrote."""
    record = json.loads((RESULTS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    if "table" in record:
        return record["table"]
    return _table_from_markdown(RESULTS_DIR / f"{name}.md")


def render_record(name: str, *, plot_uri: str | None = None) -> str:
    """The Markdown that replaces `<!-- benchmark: NAME -->`.

    Raises:
        FileNotFoundError: there is no benchmarks/results/NAME.json.
    """
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"<!-- benchmark: {name} -->: no record {path.relative_to(ROOT)}; records: {', '.join(record_names())}")
    record = json.loads(path.read_text(encoding="utf-8"))
    table = table_of(name)
    lines = [f"*{table['title']}* — `benchmarks/results/{name}.json`. {machine_line(record)}", ""]
    lines += [f"- {_escape_html(note)}" for note in table["notes"]]
    if table["notes"]:
        lines.append("")
    lines.append("| " + " | ".join(table["columns"]) + " |")
    lines.append("|" + " --- |" * len(table["columns"]))
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in table["rows"]]
    if plot_uri is not None:
        lines += ["", f"![{table['title']}]({plot_uri})"]
    return "\n".join(lines)


def _escape_html(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;")


def expand_markers(markdown: str, *, plot_uri_for: Any = None) -> str:
    """`markdown` with every benchmark marker replaced by its record."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        plot = (RESULTS_DIR / f"{name}.png").is_file() and plot_uri_for is not None
        return render_record(name, plot_uri=plot_uri_for(name) if plot else None)

    return MARKER.sub(replace, markdown)


# ---------------------------------------------------------------- MkDocs hook events
def on_files(files: Any, config: Any) -> Any:
    """Add each results plot to the site, so a page can show it."""
    from mkdocs.structure.files import File

    for png in sorted(RESULTS_DIR.glob("*.png")):
        files.append(File.generated(config, PLOT_URI.format(name=png.stem), abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    depth = page.file.src_uri.count("/")

    def plot_uri_for(name: str) -> str:
        return "../" * depth + PLOT_URI.format(name=name)

    try:
        return expand_markers(markdown, plot_uri_for=plot_uri_for)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise PluginError(f"{page.file.src_uri}: {exc}") from exc
