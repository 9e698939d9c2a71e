"""The documentation cannot drift from the code: the generated CLI reference, the benchmark records,
the environment variables and the one-screen README are checked against what they describe."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from perta_stream.config.merge import MergeConfig
from perta_stream.config.options import option

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_BYTES = 10 * 1024


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_tool_{name}", ROOT / "tools" / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cli_reference = _tool("cli_reference")
benchmark_tables = _tool("benchmark_tables")


def test_the_committed_cli_reference_is_what_the_parser_generates():
    committed = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    assert committed == cli_reference.render_cli_reference(), "docs/reference/cli.md is stale: run `make docs-pages`"


def test_the_cli_reference_lists_every_flag_of_every_command():
    from perta_stream.cli import build_parser, command_parser

    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    for name in ("merge", "stats", "unlearn", "eval", "sweep", "finetune", "verify", "demo", "convert", "models"):
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in command_parser(parser, name)._actions:
            if set(action.option_strings) & set(cli_reference.COMMON_FLAGS):
                continue  # -h, -v, -q, --config: listed once at the top of the page
            for flag in action.option_strings:
                assert f"`{flag}`" in section, f"{flag} of {name} is missing from docs/reference/cli.md"


def test_an_option_added_without_regenerating_makes_the_reference_stale(monkeypatch):
    import perta_stream.cli as cli

    @dataclasses.dataclass(frozen=True)
    class MergeWithANewOption(MergeConfig):
        shiny_new_knob: int = option(3, help="an option added to merge")

    monkeypatch.setitem(cli.COMMAND_CONFIGS, "merge", (MergeWithANewOption, *cli.COMMAND_CONFIGS["merge"][1:]))
    rendered = cli_reference.render_cli_reference()
    assert "| `--shiny-new-knob` `SHINY_NEW_KNOB` | `shiny_new_knob` | an option added to merge |" in rendered
    assert rendered != (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")


def test_the_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text(cli_reference.render_cli_reference().replace("--alpha", "--alfa", 1), encoding="utf-8")
    monkeypatch.setattr(cli_reference, "PAGE", stale)
    monkeypatch.setattr(cli_reference, "ROOT", tmp_path)
    assert cli_reference.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    cli_reference.main(["--write"])
    assert cli_reference.main(["--check"]) == 0


def _markers() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for page in DOCS.rglob("*.md"):
        for name in benchmark_tables.MARKER.findall(page.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(str(page.relative_to(DOCS)))
    return found


def test_every_benchmark_record_is_shown_in_the_docs_once():
    markers = _markers()
    assert sorted(markers) == benchmark_tables.record_names(), "each benchmarks/results/NAME.json needs one <!-- benchmark: NAME --> in docs/"
    assert all(len(pages) == 1 for pages in markers.values()), markers


@pytest.mark.parametrize("name", benchmark_tables.record_names())
def test_each_record_renders_its_table_with_the_machine_it_ran_on(name):
    rendered = benchmark_tables.render_record(name)
    table = benchmark_tables.table_of(name)
    assert re.search(r"Ran on .*\d+ CPU cores, [\d.]+ GiB RAM", rendered), rendered[:300]
    assert table["columns"] and table["rows"]
    table_lines = [line for line in rendered.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(table["rows"])
    assert all(line.count(" | ") == len(table["columns"]) - 1 for line in table_lines if "\\|" not in line)


def test_a_marker_naming_no_record_fails():
    with pytest.raises(FileNotFoundError, match="no record benchmarks/results/no_such_bench.json"):
        benchmark_tables.expand_markers("text\n<!-- benchmark: no_such_bench -->\n")


def test_a_record_without_its_table_falls_back_to_the_markdown_its_run_wrote(tmp_path, monkeypatch):
    (tmp_path / "old.json").write_text('{"machine": {"cpu_count": 4, "memory_bytes": 8589934592}, "timestamp": "T"}', encoding="utf-8")
    (tmp_path / "old.md").write_text("# An old run\n\n- a note\n\n| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n", encoding="utf-8")
    monkeypatch.setattr(benchmark_tables, "RESULTS_DIR", tmp_path)
    rendered = benchmark_tables.render_record("old")
    assert "*An old run*" in rendered and "Ran on 4 CPU cores, 8.0 GiB RAM; T." in rendered
    assert "- a note" in rendered and "| 1 | 2 |\n| 3 | 4 |" in rendered


def test_the_environment_page_lists_every_variable_the_package_reads():
    page = (DOCS / "reference" / "environment.md").read_text(encoding="utf-8")
    read = set()
    for source in (ROOT / "perta_stream").rglob("*.py"):
        read |= set(re.findall(r"\b(PERTA_[A-Z_]+)\b", source.read_text(encoding="utf-8")))
    assert read and {name for name in read if f"`{name}" not in page} == set()


def test_every_nav_entry_is_a_page():
    entries = []

    def walk(entry):
        if isinstance(entry, str):
            entries.append(entry)
        elif isinstance(entry, (list, tuple)):
            for item in entry:
                walk(item)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)

    walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    assert entries and [entry for entry in entries if not (DOCS / entry).is_file()] == []


def test_the_readme_is_one_screen_that_starts_with_the_two_commands_and_links_into_the_docs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= README_MAX_BYTES
    first_screen = "\n".join(text.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and [link for link in links if not (ROOT / link).exists()] == []


def test_the_makefiles_test_target_is_the_command_the_readme_names():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^test: setup\n\t\$\(PY\) -m pytest -q$", makefile, re.MULTILINE)
    assert "make test " in (ROOT / "README.md").read_text(encoding="utf-8")
