"""`--config` YAML files: read strictly and within bounds, and layered in order.

A config file is a flat mapping of option: value, where a value is one word or number, true or
false, or a list of those. It is read so that its words mean what the same words mean as flags:

- a plain value other than true/false/null stays text, parsed by the option's own parser, so
  `alpha: 010` is 10 (as `--alpha 010` is), not YAML 1.1's octal 8, and `1:30` is refused as
  `--alpha 1:30` is instead of becoming 90;
- anchors, aliases and tags (`&a`, `*a`, `!!int`) are refused: an alias lets a few hundred bytes
  expand into gigabytes once list values are joined, and a tag changes what a word means;
- a key given twice (in any of its spellings) is refused instead of the last one winning silently;
- the file is at most `MAX_CONFIG_BYTES` of UTF-8 and nests no deeper than a list of values.

Several files (`--config base.yaml --config run.yaml`) are layered in the order given: a later
file's keys replace an earlier one's, and flags given on the command line win over all of them.
Errors name the file, the line and the key, never a whole value.

PyYAML parses; this module only narrows what its composer accepts (no maintained YAML library
offers "YAML without aliases and implicit types" as an option) and turns the node tree into values.
"""

from __future__ import annotations

import difflib
import functools
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perta_stream.errors import UsageError

# A config is a few hundred bytes; a megabyte bounds what a hostile or mistaken file can cost.
MAX_CONFIG_BYTES = 2**20
# mapping -> value -> list item
_MAX_DEPTH = 3
_TRUE = frozenset({"true", "True", "TRUE"})
_FALSE = frozenset({"false", "False", "FALSE"})
_NULL = frozenset({"", "~", "null", "Null", "NULL"})


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters: messages never echo a whole value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}…({len(text)} characters)"


def config_paths(value: Any, flag: str = "--config") -> tuple[str, ...]:
    """The config files a `--config` (CLI: a list) or `config=` (API: a path or list) names.

    Raises:
        UsageError: the value is neither a path nor a list of paths.
    """
    if value is None:
        return ()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(item, (str, os.PathLike)) for item in items):
        raise UsageError(
            f"{flag} takes the path of a YAML file (or a list of paths), not {shown(value)}; pass options as keywords instead"
        )
    return tuple(os.fspath(item) for item in items)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options of one YAML config file, as a flat mapping (see the module's docstring).

    Raises:
        UsageError: the file is missing, a folder, too large, not UTF-8, not YAML, not a flat
            mapping, or uses anchors, aliases, tags or a key twice; the message is one line.
    """
    where = f"--config {path}"
    text = _read_text(Path(path), where)
    import yaml

    try:
        loader = _strict_loader()(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except _Refused as exc:
        raise UsageError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{where} is not valid YAML{line}: {' '.join(str(problem).split())[:200]}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        kind = "list" if isinstance(root, yaml.SequenceNode) else "single value"
        raise UsageError(f"{where} must hold a mapping of option: value, not a {kind}")
    return _mapping(root, where)


def _read_text(path: Path, where: str) -> str:
    try:
        status = path.stat()
    except FileNotFoundError:
        raise UsageError(f"{where} does not exist; see configs/ for examples") from None
    except OSError as exc:
        raise UsageError(f"{where} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(status.st_mode):
        raise UsageError(f"{where} is a folder; give the YAML file inside it")
    if not stat.S_ISREG(status.st_mode):
        raise UsageError(f"{where} is not a regular file; give a YAML file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{where} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"{where} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a config file holds a few options")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from None


def _mapping(node: Any, where: str) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise UsageError(f"{where}, line {line}: a key must be an option name")
        key = key_node.value
        if key in options:
            raise UsageError(f"{where}, line {line}: key {shown(key)} is given twice; keep one")
        if isinstance(value_node, yaml.MappingNode):
            raise UsageError(f"{where}, line {line}: {shown(key)} holds a mapping; an option takes a value or a list of values")
        if isinstance(value_node, yaml.SequenceNode):
            items = []
            for item in value_node.value:
                if not isinstance(item, yaml.ScalarNode):
                    raise UsageError(f"{where}, line {item.start_mark.line + 1}: {shown(key)} holds a nested list or mapping; list plain values")
                items.append(_scalar(item))
            options[key] = items
        else:
            options[key] = _scalar(value_node)
    return options


def _scalar(node: Any) -> str | bool | None:
    """A plain `true`/`false`/`null` (or nothing) is that; every other value is its text."""
    if node.style is None:
        if node.value in _TRUE:
            return True
        if node.value in _FALSE:
            return False
        if node.value in _NULL:
            return None
    return node.value


class _Refused(Exception):
    """YAML this reader does not take (an anchor, alias, tag or deep nesting)."""


@functools.cache
def _strict_loader() -> type:
    """The loader class, built on first use (PyYAML is imported lazily)."""
    import yaml

    class StrictLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, yaml.resolver.BaseResolver):
        """PyYAML's reader, scanner, parser and composer, with no implicit types, refusing
        anchors, aliases, tags and nesting deeper than a list of values."""

        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            yaml.resolver.BaseResolver.__init__(self)
            self.depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise _Refused(f"line {line}: anchors and aliases (&name, *name) are not read; write each value out")
            if getattr(event, "tag", None) is not None:
                raise _Refused(f"line {line}: tags (!!type) are not read; write the value as on the command line")
            if self.depth >= _MAX_DEPTH:
                raise _Refused(f"line {line}: values nest too deep; an option takes a value or a list of values")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return StrictLoader


def layered_options(paths: Sequence[str], canonical: Callable[[str], str | None], known: Sequence[str]) -> dict[str, tuple[str, Any]]:
    """The options of several config files layered in order: canonical name -> (key as written, value).

    Args:
        paths: the files, earliest first; a later file's option replaces an earlier one's.
        canonical: maps a key (any spelling, `-` or `_`) to the option it names, or None when
            it names none.
        known: the keys there are, for "did you mean".

    Raises:
        UsageError: a file's problems (as `load_config_file`), or its unknown keys and two
            spellings of one option in it, all of one file at once.
    """
    layered: dict[str, tuple[str, Any]] = {}
    for path in paths:
        seen: dict[str, str] = {}
        problems = []
        for key, value in load_config_file(path).items():
            name = canonical(key)
            if name is None:
                problems.append(f"unknown key {shown(key)}{closest_key(key, known)}")
            elif name in seen:
                problems.append(f"keys {shown(seen[name])} and {shown(key)} name the same option; keep one")
            else:
                seen[name] = key
                layered[name] = (key, value)
        if problems:
            raise UsageError(f"--config {path}: {'; '.join(problems)}")
    return layered


def closest_key(key: str, known: Sequence[str]) -> str:
    """"; did you mean X?" for a mistyped key, else ""."""
    close = difflib.get_close_matches(str(key).replace("-", "_"), list(known), n=1)
    return f"; did you mean {close[0].replace('_', '-')}?" if close else ""


def parser_defaults(command: Any, paths: Sequence[str]) -> dict[str, Any]:
    """The options of config files as argparse defaults of `command` (an ArgumentParser), layered.

    A value becomes the text a flag would give (a list joined with commas) and argparse parses it
    with the flag's own type, so a file and the command line cannot read one word differently.

    Raises:
        UsageError: as `layered_options`, naming the closest flag for an unknown key.
    """
    # Every spelling of a flag is a key (`alpha` and `alphas` in sweep).
    by_key = {
        flag.lstrip("-").replace("-", "_"): action
        for action in command._actions
        if action.dest not in ("help", "config")
        for flag in action.option_strings
        if flag.startswith("--")
    }
    layered = layered_options(paths, lambda key: _dest(by_key, key), known=list(by_key))
    return {dest: ",".join(str(item) for item in value) if isinstance(value, list) else value for dest, (_, value) in layered.items()}


def _dest(by_key: dict[str, Any], key: str) -> str | None:
    action = by_key.get(str(key).replace("-", "_"))
    return None if action is None else action.dest
