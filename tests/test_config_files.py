"""`--config` files: bounded, strict, read as the flags read their words, layered in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from perta_stream.cli import main, parse_arguments
from perta_stream.config.merge import MergeConfig
from perta_stream.config.options import with_config_file
from perta_stream.errors import UsageError

BASE = "theta0: a\nfull: b\nfgt: c\nout: base_out\nalpha: 1\nmethod: tv\n"


def _yaml(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _usage_error(capsys, argv: list[str]) -> str:  # noqa: ANN001
    """The one line a refused command line prints (exit code 2)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err[:300]
    return err


def _merge_config(argv: list[str]) -> MergeConfig:
    return MergeConfig.from_cli(parse_arguments(argv))


# ---------------------------------------------------------------- bounded: aliases cannot expand
def test_an_alias_bomb_is_refused_at_once_in_one_short_line(tmp_path, capsys):
    # Each level repeats the one before ten times: joined into text, the last is megabytes.
    lines = ["tau: &a [1,1,1,1,1,1,1,1,1,1]"]
    for level, key in enumerate(["uniform-weight", "fallback-weight", "max-shard-size", "max-memory"], start=1):
        anchor, previous = "abcde"[level], "abcde"[level - 1]
        lines.append(f"{key}: &{anchor} [{','.join(['*' + previous] * 10)}]")
    lines.append(f"out-dtype: [{','.join(['*e'] * 10)}]")
    bomb = _yaml(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    assert bomb.stat().st_size < 600
    err = _usage_error(capsys, ["merge", "--config", str(bomb)])
    assert len(err) < 400 and "anchors and aliases" in err and "line 1" in err


def test_anchors_and_tags_are_refused_and_long_values_never_echoed(tmp_path, capsys):
    anchored = _yaml(tmp_path, "anchor.yaml", BASE.replace("alpha: 1", "alpha: &x 1\ntau: *x"))
    assert "anchors and aliases" in _usage_error(capsys, ["merge", "--config", str(anchored)])
    tagged = _yaml(tmp_path, "tag.yaml", BASE.replace("alpha: 1", "alpha: !!int 010"))
    assert "tags" in _usage_error(capsys, ["merge", "--config", str(tagged)])
    long_value = _yaml(tmp_path, "long.yaml", BASE.replace("alpha: 1", "alpha: " + "9x" * 200_000))
    err = _usage_error(capsys, ["merge", "--config", str(long_value)])
    assert "--alpha" in err and len(err) < 400
    with pytest.raises(UsageError) as caught:
        MergeConfig.from_options(with_config_file(MergeConfig, long_value, {}))
    assert "--alpha" in str(caught.value) and len(str(caught.value)) < 400


def test_a_file_above_the_size_cap_is_refused(tmp_path, capsys):
    huge = _yaml(tmp_path, "huge.yaml", BASE + "# " + "x" * (2**20) + "\n")
    assert "larger than 1 MiB" in _usage_error(capsys, ["merge", "--config", str(huge)])


# ---------------------------------------------------------------- several files: layered in order
def test_repeated_config_files_are_layered_in_order_and_flags_win(tmp_path):
    base = _yaml(tmp_path, "base.yaml", BASE)
    run = _yaml(tmp_path, "run.yaml", "out: run_out\nalpha: [0.5, 2]\nmethod: uniform\n")
    config = _merge_config(["merge", "--config", str(base), "--config", str(run)])
    assert (config.out, config.alphas, config.method, config.theta0) == ("run_out", (0.5, 2.0), "uniform", "a")
    config = _merge_config(["merge", "--config", str(run), "--config", str(base)])
    assert (config.out, config.alphas, config.method) == ("base_out", (1.0,), "tv")
    config = _merge_config(["merge", "--config", str(base), "--config", str(run), "--alpha", "3", "--out", "flag_out"])
    assert (config.out, config.alphas, config.method) == ("flag_out", (3.0,), "uniform")
    # Another spelling of the same option in a later file replaces it too.
    spelled = _yaml(tmp_path, "spelled.yaml", "uniform_weight: 0.25\n")
    config = _merge_config(["merge", "--config", str(base), "--config", str(run), "--config", str(spelled)])
    assert config.uniform_weight == 0.25
    # The Python API layers a list of files the same way.
    options = with_config_file(MergeConfig, [base, run], {"alpha": 3})
    config = MergeConfig.from_options(options)
    assert (config.out, config.alphas, config.method) == ("run_out", (3.0,), "uniform")


def test_an_abbreviated_config_flag_is_loaded_or_refused_never_ignored(tmp_path, capsys):
    base = _yaml(tmp_path, "base.yaml", BASE)
    run = _yaml(tmp_path, "run.yaml", "out: run_out\n")
    config = _merge_config(["merge", "--conf", str(base), f"--confi={run}"])
    assert (config.theta0, config.out) == ("a", "run_out")
    # stats also has --config-only: `--conf` could mean either, and is refused.
    assert "ambiguous" in _usage_error(capsys, ["stats", "--conf", str(base)])


# ---------------------------------------------------------------- values read as the flags read them
def test_values_mean_what_the_same_words_mean_as_flags(tmp_path, capsys):
    octal = _yaml(tmp_path, "octal.yaml", BASE.replace("alpha: 1", "alpha: 010") + "max-shard-size: 010\n")
    from_file = _merge_config(["merge", "--config", str(octal)])
    from_flags = _merge_config(["merge", "--config", str(_yaml(tmp_path, "plain.yaml", BASE)), "--alpha", "010", "--max-shard-size", "010"])
    assert from_file.alphas == from_flags.alphas == (10.0,)
    assert from_file.max_shard_bytes == from_flags.max_shard_bytes == 10
    assert MergeConfig.from_options(with_config_file(MergeConfig, octal, {})).alphas == (10.0,)
    sexagesimal = _yaml(tmp_path, "time.yaml", BASE.replace("alpha: 1", "alpha: 1:30"))
    err = _usage_error(capsys, ["merge", "--config", str(sexagesimal)])
    assert "--alpha" in err and "'1:30'" in err
    with pytest.raises(UsageError, match="1:30"):
        MergeConfig.from_options(with_config_file(MergeConfig, sexagesimal, {}))
    switches = _yaml(tmp_path, "switch.yaml", BASE + "overwrite: true\ndry-run: false\nstats: null\n")
    config = _merge_config(["merge", "--config", str(switches)])
    assert (config.overwrite, config.dry_run, config.stats) == (True, False, None)


def test_duplicate_keys_are_refused(tmp_path, capsys):
    twice = _yaml(tmp_path, "twice.yaml", BASE + "alpha: 2\n")
    err = _usage_error(capsys, ["merge", "--config", str(twice)])
    assert "line 7" in err and "'alpha' is given twice" in err
    spellings = _yaml(tmp_path, "spellings.yaml", BASE + "alphas: 2\n")
    with pytest.raises(UsageError, match="name the same option"):
        with_config_file(MergeConfig, spellings, {})


@pytest.mark.parametrize(
    "content, message",
    [
        (b"theta0: a\nout: \xff\xfe\n", "is not UTF-8 text (byte 0xff at offset 15)"),
        (b"- a\n- b\n", "must hold a mapping of option: value, not a list"),
        (b"alpha: {a: 1}\n", "holds a mapping"),
        (b"alpha: [[1, 2]]\n", "values nest too deep"),
        (b"alpha: [[]]\n", "nested list"),
        (b"alpha: [1, 2\n", "is not valid YAML (line 2)"),
        (b"a: 1\n---\nb: 2\n", "is not valid YAML"),
    ],
)
def test_unusable_files_are_one_line_typed_errors(tmp_path, capsys, content, message):
    path = _yaml(tmp_path, "bad.yaml", content)
    assert message in _usage_error(capsys, ["merge", "--config", str(path)])
    with pytest.raises(UsageError, match=message.split(" (")[0]):
        with_config_file(MergeConfig, path, {})


def test_a_folder_and_a_missing_file_are_told_apart(tmp_path, capsys):
    (folder := tmp_path / "configs").mkdir()
    assert "is a folder" in _usage_error(capsys, ["merge", "--config", str(folder)])
    assert "does not exist" in _usage_error(capsys, ["merge", "--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("value", [{}, {"alpha": 1}, 3, [{}]])
def test_the_api_config_keyword_takes_paths_only(value):
    import perta_stream as ps

    with pytest.raises(UsageError, match="config= takes the path of a YAML file"):
        ps.merge(theta0="a", full="b", fgt="c", out="o", config=value)
