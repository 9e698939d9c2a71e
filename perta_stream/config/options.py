"""One option vocabulary: a config field's metadata is its flag, its help text and its parsing.

A config field declared with `option(...)` is an option of every command built from that config:
the CLI generates its flag from the metadata (`add_options`), `--config` YAML keys and the Python
API's keywords are the same words (`from_options`), and its value is parsed the same way wherever
it comes from (the text a flag gives, or a Python value). The flag is the field's name with `-`
unless the metadata says otherwise (`alphas` is `--alpha`, `max_memory_bytes` is `--max-memory`);
every spelling in `flags` is accepted, the first is the one help and messages use.

    seed: int = option(0, help="seed of the --fraction subset (default 0)", parse=integer)

Fields without `option(...)` are Python-only (a command never sets them).
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from perta_stream.config.config_file import shown
from perta_stream.errors import PlanError, UsageError

_KEY = "perta_option"
# Keywords every command takes besides its config's options: `-q` (progress bars off) and
# `--config FILE.yaml`. They are suggested for a mistyped keyword like any option.
COMMON_KEYWORDS = ("quiet", "config")
RESUME_HELP = "continue an interrupted run of the same command from <out>.partial/ (finished shards are re-hashed and kept)"


@dataclass(frozen=True)
class Option:
    """The metadata of one option field.

    Attributes:
        flags: its spellings, canonical first (`--alpha`, `--alphas`); a word without dashes is positional.
        help: the help text (it states the default where there is one).
        parse: turns a flag's text or a Python value into the field's value; raises TypeError,
            ValueError or UsageError with a message that says what is wrong.
        arg_type: the type argparse applies to the text (int, float, ...), so a bad number is a usage error.
        choices: the words argparse accepts (a mistyped one gets "did you mean").
        metavar, group: argparse's metavar and the help section the flag is listed under.
        switch: a flag without a value (True when given).
    """

    flags: tuple[str, ...]
    help: str
    parse: Callable[[Any, str], Any]
    arg_type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    group: str | None = None
    switch: bool = False

    def keywords(self) -> tuple[str, ...]:
        """The Python keywords and YAML keys of this option: each flag with `_` for `-`."""
        return tuple(flag.lstrip("-").replace("-", "_") for flag in self.flags)


# ---------------------------------------------------------------- parsers (value, flag) -> field value
def text(value: Any, flag: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"expected a string, got {shown(value)}")


def integer(value: Any, flag: str) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError
        return int(value)
    except (TypeError, ValueError):
        raise TypeError(f"expected an integer, got {shown(value)}") from None


def number(value: Any, flag: str) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"expected a number, got {shown(value)}") from None


def numbers(value: Any, flag: str) -> tuple[float, ...]:
    """`0.5,1,2`, `[0.5, 1, 2]` or `1` -> (0.5, 1.0, 2.0)."""
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    return tuple(number(part, flag) for part in parts if not isinstance(part, str) or part.strip())


def words(value: Any, flag: str) -> tuple[str, ...]:
    """`grad,fisher` or `[grad, fisher]` -> ("grad", "fisher")."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(part).strip().lower() for part in parts if str(part).strip())


def switch(value: Any, flag: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected True or False, got {shown(value)}")
    return value


def negated_switch(value: Any, flag: str) -> bool:
    """A switch that turns its field off (`--delete-models` sets keep_models to False)."""
    return not switch(value, flag)


def size(value: Any, flag: str) -> int | None:
    """`2G`, `512MiB`, `5GB` or a number of bytes."""
    from perta_stream.sizes import parse_size

    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return parse_size(str(value), what=flag)


def size_or_zero(value: Any, flag: str) -> int | None:
    """A size where 0 means none (a boundary budget of 0 spills every boundary)."""
    return 0 if str(value).strip() == "0" else size(value, flag)


def dtype(value: Any, flag: str) -> str | None:
    """A dtype as people write it (`bf16`, `bfloat16`) -> its safetensors name."""
    from perta_stream.dtypes import parse_user_dtype

    return None if value is None else parse_user_dtype(str(value))


def empty_is_none(value: Any, flag: str) -> str | None:
    """Text where "" means not given (a system prompt: statistics record an empty one as None)."""
    return text(value, flag) or None


def option(
    default: Any = MISSING,
    *,
    help: str,
    flags: tuple[str, ...] = (),
    parse: Callable[[Any, str], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    group: str | None = None,
    default_factory: Callable[[], Any] | Any = MISSING,
    **field_options: Any,
) -> Any:
    """A dataclass field that is a command-line option (see the module's docstring).

    `parse` defaults from the default's type (a bool is a switch, an int an integer, a float a
    number, anything else text); `flags` defaults to the field's name with dashes.
    """
    sample = default if default is not MISSING else None
    if parse is None:
        parse = switch if isinstance(sample, bool) else integer if isinstance(sample, int) else number if isinstance(sample, float) else text
    arg_type = {integer: int, number: float, numbers: float_list}.get(parse)
    meta = Option(flags, help, parse, arg_type, choices, metavar, group, switch=parse in (switch, negated_switch))
    return field(default=default, default_factory=default_factory, metadata={_KEY: meta}, **field_options)


def float_list(raw: str) -> tuple[float, ...]:
    try:
        return numbers(raw, "")
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{shown(raw)} is not a number or a comma-separated list of numbers") from None


def options_of(cls: type) -> dict[str, Option]:
    """Field name -> Option of every option field of a config class (its flags filled in)."""
    found = {}
    for item in fields(cls):
        meta = item.metadata.get(_KEY)
        if meta is not None:
            found[item.name] = meta if meta.flags else _with_flags(meta, ("--" + item.name.replace("_", "-"),))
    return found


def _with_flags(meta: Option, flags: tuple[str, ...]) -> Option:
    from dataclasses import replace

    return replace(meta, flags=flags)


def field_values(config: Any, group: type) -> dict[str, Any]:
    """The values of `config`'s fields that `group` (an option group it is built from) declares."""
    return {item.name: getattr(config, item.name) for item in fields(group)}


# ---------------------------------------------------------------- the command line and mappings
def add_options(
    parser: argparse.ArgumentParser, cls: type, *, required: bool = True, help_overrides: Mapping[str, str] | None = None
) -> None:
    """Declare `cls`'s option fields as flags of `parser`.

    Every flag's default is None (a switch's too), so a value in the parsed arguments is one the
    command line (or its --config file) gave; the config's own default applies to the rest. With
    `required`, the options without a default are required flags (a --config file may give them).
    """
    groups: dict[str, Any] = {}
    table = options_of(cls)
    # The options a command needs come first in its help.
    for item in sorted(fields(cls), key=lambda item: item.default is not MISSING or item.default_factory is not MISSING):
        meta = table.get(item.name)
        if meta is None:
            continue
        target = parser if meta.group is None else groups.setdefault(meta.group, parser.add_argument_group(meta.group))
        help_text = (help_overrides or {}).get(item.name, meta.help)
        if not meta.flags[0].startswith("-"):
            target.add_argument(item.name, nargs="?", help=help_text, metavar=meta.flags[0].upper())
        elif meta.switch:
            target.add_argument(*meta.flags, dest=item.name, action="store_true", default=None, help=help_text)
        else:
            mandatory = required and item.default is MISSING and item.default_factory is MISSING
            target.add_argument(
                *meta.flags,
                dest=item.name,
                type=meta.arg_type,
                choices=meta.choices,
                metavar=meta.metavar or (None if meta.choices else meta.keywords()[0].upper()),
                required=mandatory,
                help=help_text,
            )


def from_options(cls: type, options: Mapping[str, Any], *, title: str, **fixed: Any) -> Any:
    """Build `cls` from options named by any spelling of their flags (`alpha`, `max-memory`,
    `max_memory_bytes`); None values are left to the defaults, `fixed` are Python-only fields.

    Raises:
        PlanError: every unknown name, unparsable value, missing required option and invalid
            combination, all at once (`title` heads the message unless the config's own check names one).
    """
    table = options_of(cls)
    by_keyword = {keyword: name for name, meta in table.items() for keyword in (name, *meta.keywords())}
    values: dict[str, Any] = dict(fixed)
    problems: list[str] = []
    for raw_key, value in options.items():
        key = str(raw_key).replace("-", "_")
        name = by_keyword.get(key)
        if name is None:
            problems.append(unknown_keyword_problem(raw_key, {m.keywords()[0] for m in table.values()} | set(COMMON_KEYWORDS)))
        elif value is not None:
            try:
                parsed = _parse(table[name], value)
            except (TypeError, ValueError, UsageError) as exc:
                problems.append(str(exc) if table[name].flags[0] in str(exc) else f"option {shown(raw_key)} ({table[name].flags[0]}): {exc}")
                continue
            if name in values and values[name] != parsed:
                problems.append(f"{shown(raw_key)} and another spelling of {table[name].flags[0]} give different values")
            values[name] = parsed
    missing = [item.name for item in fields(cls) if item.default is MISSING and item.default_factory is MISSING and item.name not in values]
    problems += [f"{table[name].flags[0] if name in table else name} is required (give it as a flag, a --config key or a Python keyword)" for name in missing]
    if not missing:
        try:
            config = cls(**values)
        except PlanError as exc:
            title, problems = exc.args[0], problems + exc.problems
        else:
            if not problems:
                return config
    raise PlanError(title, problems)


def unknown_keyword_problem(raw_key: Any, known: set[str]) -> str:
    """"unknown option 'x'; did you mean 'y'?": one of `known` with the same letters in another
    order (a transposition: `otu` is `out`, not `tau`), else the closest by spelling, else a
    looser spelling match."""
    key = str(raw_key).replace("-", "_")
    if key == "verbose":
        return "unknown option 'verbose': -v is a command-line flag; in Python, configure logging (logging.basicConfig(level=logging.INFO))"
    candidates = sorted(known)
    close = [word for word in candidates if sorted(word) == sorted(key)][:1]
    close = close or difflib.get_close_matches(key, candidates, n=1)
    close = close or difflib.get_close_matches(key, candidates, n=1, cutoff=0.4)
    return f"unknown option {shown(raw_key)}" + (f"; did you mean {close[0]!r}?" if close else "")


def _parse(meta: Option, value: Any) -> Any:
    parsed = meta.parse(value, meta.flags[0])
    if meta.choices is not None and parsed not in meta.choices:
        close = difflib.get_close_matches(str(parsed), meta.choices, n=1)
        raise ValueError(f"{meta.flags[0]} {shown(parsed)} is not one of {', '.join(meta.choices)}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return parsed


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of `cls` that a parsed command line gave (flags left out are None there)."""
    return {meta.keywords()[0]: getattr(args, name) for name, meta in options_of(cls).items() if getattr(args, name, None) is not None}


def options_from_cli(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of `cls` that a parsed command line gives: its `--config` file's keys, then
    the flags given (which win)."""
    return with_config_file(cls, getattr(args, "config", None), given_options(args, cls))


def with_config_file(cls: type, paths: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of the YAML file(s) at `paths` (a path, a list of paths layered in order, or
    None) under the options `given` (which win, whatever spelling either uses). The common flags
    (-v, -q) are no options of a config; a key no option has is passed on for `from_options` to
    report with the closest name.

    Raises:
        UsageError: `paths` is not a path or list of paths, or a file cannot be used
            (config/config_file.py).
    """
    from perta_stream.config.config_file import config_paths, layered_options

    spelled = {keyword: meta.keywords()[0] for meta in options_of(cls).values() for keyword in meta.keywords()}
    layered = layered_options(config_paths(paths), lambda key: spelled.get(str(key).replace("-", "_"), str(key)), known=list(spelled))
    options = {name: value for name, (_, value) in layered.items() if name not in ("verbose", "quiet")}
    options.update({spelled.get(str(key).replace("-", "_"), key): value for key, value in given.items()})
    return options


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options of one YAML config file (a flat mapping); see config/config_file.py.

    Raises:
        UsageError: the file is missing, not YAML, not a flat mapping, or refused.
    """
    from perta_stream.config.config_file import load_config_file as load

    return load(path)
