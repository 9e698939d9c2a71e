"""Shared benchmark helpers: measured subprocesses and result files (JSON + Markdown)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def run_measured(command: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> dict:
    """Run a command as a child process; return its wall time, peak RSS and output.

    The command runs under GNU time, whose %M is the peak RSS of the command's own process. The
    ru_maxrss that wait4 would report here is not used: Linux carries a process's pre-exec RSS
    into it, which for a child forked from this (large) benchmark process is this process's RSS.
    """
    started = time.perf_counter()
    completed = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB=%M", *command], env=env, cwd=cwd, capture_output=True)
    wall_s = time.perf_counter() - started
    stdout = completed.stdout.decode(errors="replace")
    stderr_lines = completed.stderr.decode(errors="replace").rstrip("\n").split("\n")
    peak_line = stderr_lines.pop() if stderr_lines and stderr_lines[-1].startswith("PEAK_RSS_KB=") else "PEAK_RSS_KB=0"
    stderr = "\n".join(stderr_lines)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": wall_s, "peak_rss_bytes": int(peak_line.split("=")[1]) * 1024, "stdout": stdout, "stderr": stderr}


def machine_info() -> dict:
    import psutil

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
    }


def write_results(
    name: str, record: dict, table_rows: list[dict], *, title: str, notes: list[str] = (), more_tables: list[tuple[str, list[dict]]] = ()
) -> tuple[Path, Path]:
    """benchmarks/results/<name>.json (the whole record) and <name>.md (a table of `table_rows`).

    The record also holds the table under "table" (title, notes, columns, rows as printed), from
    which the documentation renders it (tools/docs/benchmark_tables.py) beside the machine.
    `more_tables` ((heading, rows) each) follow it in the Markdown file only."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    columns, cells = _table(table_rows)
    record = {**record, "table": {"title": title, "notes": list(notes), "columns": columns, "rows": cells}}
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    if notes:
        lines.append("")
    lines += _markdown_table(columns, cells)
    for heading, rows in more_tables:
        lines += ["", f"## {heading}", "", *_markdown_table(*_table(rows))]
    md_path = RESULTS_DIR / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = list(rows[0]) if rows else []
    return columns, [[_cell(row[c]) for c in columns] for row in rows]


def _markdown_table(columns: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *("| " + " | ".join(row) + " |" for row in cells)]


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
