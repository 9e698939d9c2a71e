"""One option vocabulary, checked from the parsers themselves so it cannot drift: every flag of a
config-backed command is a field of its config, every option has the same spellings in every
command that has it, and the Python API's keywords are those spellings."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest

from perta_stream.cli import COMMAND_CONFIGS, _COMMANDS, build_parser, command_parser
from perta_stream.config.options import options_of

COMMON = {"-h", "--help", "-v", "--verbose", "-q", "--quiet", "--config"}


def _flags(command: str) -> dict[str, tuple[str, ...]]:
    """dest -> the spellings of every long flag of one command's parser."""
    parser = command_parser(build_parser(), command)
    return {
        action.dest: tuple(action.option_strings)
        for action in parser._actions
        if action.option_strings and not set(action.option_strings) & COMMON
    }


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_flag_is_a_config_field_with_the_same_spellings(command):
    config = COMMAND_CONFIGS[command][0]
    table = options_of(config)
    field_names = {item.name for item in fields(config)}
    flags = _flags(command)
    for dest, spellings in flags.items():
        assert dest in field_names, f"{command}: flag {spellings} is no field of {config.__name__}"
        assert spellings == table[dest].flags, (command, dest)
    # ... and every option field of the config is a flag of the command.
    positional = {name for name, meta in table.items() if not meta.flags[0].startswith("-")}
    assert set(table) - positional == set(flags), command


def test_every_command_spells_each_shared_option_the_same():
    # Group every flag of every command by the option it sets (its canonical spelling); each
    # command that has the option must accept exactly the same spellings.
    spellings: dict[str, dict[str, frozenset[str]]] = {}
    owner: dict[str, str] = {}
    for command in _COMMANDS:
        for dest, flags in _flags(command).items():
            canonical = flags[0] if flags[0].startswith("--") else next(f for f in flags if f.startswith("--"))
            spellings.setdefault(canonical, {})[command] = frozenset(flags)
            for flag in flags:
                # One spelling never names two different options.
                assert owner.setdefault(flag, canonical) == canonical, (command, flag, owner[flag], canonical)
    shared = {canonical: by_command for canonical, by_command in spellings.items() if len(by_command) > 1}
    assert {"--alpha", "--method", "--stats", "--device", "--max-length", "--overwrite", "--system-prompt"} <= set(shared)
    for canonical, by_command in shared.items():
        assert len(set(by_command.values())) == 1, (canonical, by_command)


def test_shared_option_groups_are_declared_once():
    from perta_stream.config.alpha_unit import AlphaUnitOptions
    from perta_stream.config.merge import HubPushOptions, MergeConfig, MergeOptions
    from perta_stream.config.stats import StatsConfig, StatsOptions
    from perta_stream.config.eval import EvalConfig, QaFilesOptions
    from perta_stream.config.sweep import SweepConfig
    from perta_stream.config.unlearn import UnlearnConfig
    from perta_stream.config.unlearn_own_model import AfterEvalOptions, OwnModelOptions

    groups = (
        (StatsOptions, (StatsConfig, UnlearnConfig)),
        (MergeOptions, (MergeConfig, UnlearnConfig)),
        (HubPushOptions, (MergeConfig, UnlearnConfig)),
        (OwnModelOptions, (UnlearnConfig,)),
        (AfterEvalOptions, (UnlearnConfig,)),
        (QaFilesOptions, (EvalConfig,)),
        (AlphaUnitOptions, (SweepConfig, UnlearnConfig)),
    )
    for group, configs in groups:
        for config in configs:
            assert issubclass(config, group)
            # A config re-declaring a group's field would shadow the group's metadata.
            for item in fields(group):
                assert options_of(config)[item.name] == options_of(group)[item.name], (config.__name__, item.name)
    # Only a config's own options and the groups': nothing copied.
    own = {item.name for item in fields(UnlearnConfig)} - {item.name for group, configs in groups if UnlearnConfig in configs for item in fields(group)}
    assert own == {"method", "forget", "retain", "stats_dir", "stats_model", "recompute_stats", "dry_run", "overwrite", "resume", "one_pass", "save_stats", "config_only"}


def test_the_api_takes_every_spelling_as_a_keyword_and_the_config_default_applies(tmp_path):
    from perta_stream.config.merge import MergeConfig
    from perta_stream.config.options import with_config_file

    theta0, full, fgt = (str(tmp_path / name) for name in ("a", "b", "c"))
    base = dict(theta0=theta0, full=full, fgt=fgt, out=str(tmp_path / "o"))
    for spelling in ("alpha", "alphas"):
        config = MergeConfig.from_options(with_config_file(MergeConfig, None, {**base, spelling: [0.5, 2]}))
        assert config.alphas == (0.5, 2.0)
    defaults = MergeConfig.from_options(base)
    for item in fields(MergeConfig):
        if item.default is not MISSING and item.name not in base:
            assert getattr(defaults, item.name) == item.default, item.name


def test_parsed_flags_default_to_none_so_files_and_defaults_can_fill_them():
    args = build_parser().parse_args(["merge", "--theta0", "a", "--full", "b", "--fgt", "c", "--out", "d"])
    assert isinstance(args, argparse.Namespace)
    assert args.alphas is None and args.dry_run is None and args.method is None
