"""A user's first hour: the Python API, --config for every command, one spelling per option,
one-line usage errors with the closest word, and sizes and devices as people write them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from perta_stream.cli import build_parser, command_parser, main
from perta_stream.errors import UsageError
from reliability_fixtures import cli_env, merge_args, synthetic_triplet, tree_digest


@pytest.fixture(scope="module")
def triplet(tmp_path_factory) -> tuple[Path, Path, Path]:
    return synthetic_triplet(tmp_path_factory.mktemp("api"))


def _shards(out: Path) -> dict[str, str]:
    return {name: digest for name, digest in tree_digest(out).items() if name.endswith(".safetensors")}


def test_python_api_in_a_fresh_interpreter_equals_the_command_line(triplet, tmp_path):
    from stats_fixtures import save_tiny_model, write_data

    theta0, full, fgt = triplet
    assert main(merge_args(theta0, full, fgt, tmp_path / "cli", "--method", "uniform", "--alpha", "0.5,2")) == 0
    model = save_tiny_model(tmp_path / "models", "llama")
    forget, retain = write_data(tmp_path / "data")
    script = f"""
import json, perta_stream as ps
merged = ps.merge(theta0={str(theta0)!r}, full={str(full)!r}, fgt={str(fgt)!r}, out={str(tmp_path / 'api')!r},
                  method="uniform", alpha=[0.5, 2], max_memory="256MiB")
stats = ps.stats(model={str(model)!r}, forget={str(forget)!r}, retain={str(retain)!r}, out={str(tmp_path / 'stats')!r},
                 kinds="grad", device="cpu", batch_size=2)
print(json.dumps({{"outputs": list(merged.outputs), "stats": str(stats.out)}}))
"""
    run = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    reported = json.loads(run.stdout.strip().splitlines()[-1])
    assert reported["outputs"] == [str(tmp_path / "api" / "alpha_0.5"), str(tmp_path / "api" / "alpha_2")]
    for alpha in ("alpha_0.5", "alpha_2"):
        assert _shards(tmp_path / "api" / alpha) == _shards(tmp_path / "cli" / alpha)
    record = json.loads((tmp_path / "stats" / "perta_stats.json").read_text())
    assert record["kinds"] == ["grad"] and record["datasets"]["forget"]["num_samples"] == 5


def test_api_keywords_are_the_flags_and_mistakes_name_the_closest(triplet, tmp_path):
    import perta_stream as ps

    theta0, full, fgt = triplet
    with pytest.raises(UsageError, match="unknown option 'alhpa'; did you mean 'alpha'"):
        ps.merge(theta0=theta0, full=full, fgt=fgt, out=tmp_path / "o", alhpa=1)
    with pytest.raises(UsageError, match="'fischer' is not one of .*did you mean 'fisher'"):
        ps.merge(theta0=theta0, full=full, fgt=fgt, out=tmp_path / "o", method="fischer")
    with pytest.raises(UsageError, match="expected True or False"):
        ps.merge(theta0=theta0, full=full, fgt=fgt, out=tmp_path / "o", overwrite="yes")
    with pytest.raises(UsageError, match="--theta0 is required"):
        ps.sweep(full=full)
    with pytest.raises(UsageError, match="needs --stats"):
        ps.merge(theta0=theta0, full=full, fgt=fgt, out=tmp_path / "o", method="grad")


def test_api_memory_budget_means_what_the_flag_means(triplet, tmp_path, monkeypatch):
    """`max_memory` and `--max-memory` give the same config: the budget the merge adds to the
    process (measured at its start by the pipeline, tests/test_merge_memory.py)."""
    import perta_stream as ps
    from perta_stream.pipelines import merge as merge_pipeline

    seen = []
    monkeypatch.setattr(merge_pipeline, "run_merge", lambda config: seen.append(config) or config)
    theta0, full, fgt = triplet
    ps.merge(theta0=theta0, full=full, fgt=fgt, out=tmp_path / "o", max_memory="2G")
    from perta_stream.cli import parse_arguments
    from perta_stream.config.merge import MergeConfig

    from_cli = MergeConfig.from_cli(parse_arguments(merge_args(theta0, full, fgt, tmp_path / "o", "--max-memory", "2G")))
    assert seen[0] == from_cli and from_cli.max_memory_bytes == 2 * 2**30


def test_every_command_reads_a_yaml_config_and_flags_win(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    config = tmp_path / "merge.yaml"
    config.write_text(f"theta0: {theta0}\nfull: {full}\nfgt: {fgt}\nout: {tmp_path / 'yaml'}\nmethod: task_arithmetic\nalpha: [0.5, 2]\n")
    assert main(["merge", "--config", str(config), "-q"]) == 0
    assert main(merge_args(theta0, full, fgt, tmp_path / "flags", "--alpha", "0.5,2")) == 0
    for alpha in ("alpha_0.5", "alpha_2"):
        assert _shards(tmp_path / "yaml" / alpha) == _shards(tmp_path / "flags" / alpha)
    # A flag given on the command line overrides the file's key.
    assert main(["merge", "--config", str(config), "--alpha", "3", "--out", str(tmp_path / "override"), "-q"]) == 0
    assert json.loads((tmp_path / "override" / "perta_merge.json").read_text())["alpha"] == 3.0
    config.write_text(f"theta0: {theta0}\nalhpa: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'alhpa'; did you mean alpha?" in err[0]
    from perta_stream.cli import _COMMANDS

    for command in _COMMANDS:
        parser = command_parser(build_parser(), command)
        assert any("--config" in action.option_strings for action in parser._actions), command
        assert f"perta-stream {command}" in parser.epilog, command  # one help example each


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["merge", "--theta0", "a", "--full", "b", "--fgt", "c", "--out", "d", "--method", "fischer"], "did you mean fisher?"),
        (["merge", "--theta0", "a", "--full", "b", "--fgt", "c", "--out", "d", "--alhpa", "1"], "did you mean --alpha?"),
        (["stats", "--model", "m", "--forget", "f", "--retain", "r", "--compute-dtype", "bflaot16"], "did you mean bfloat16?"),
    ],
)
def test_usage_errors_are_one_line_with_the_closest_word(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and hint in err[0], err


def test_shared_options_have_one_spelling_in_every_command():
    parser = build_parser()
    for flag in ("--alpha", "--method", "--stats", "--device", "--max-memory", "--overwrite", "--config"):
        holders = [name for name in ("merge", "unlearn", "sweep") if any(flag in a.option_strings for a in command_parser(parser, name)._actions)]
        expected = ["unlearn", "sweep"] if flag == "--device" else ["merge", "unlearn", "sweep"]
        assert holders == expected, (flag, holders)


def test_sizes_devices_and_method_names_as_people_write_them():
    from perta_stream.config.merge import MergeConfig
    from perta_stream.devices import device_problem
    from perta_stream.sizes import parse_size

    assert parse_size("2G", what="--max-memory") == 2 * 2**30
    assert parse_size("512m", what="--max-memory") == 512 * 2**20
    assert parse_size("5GB", what="x") == 5 * 10**9 and parse_size("5GiB", what="x") == 5 * 2**30
    assert all(device_problem(d) is None for d in ("auto", "cpu", "cuda", "cuda:1", "cuda:12"))
    assert all(device_problem(d) for d in ("gpu", "cuda:", "cuda:x", "tpu"))
    assert MergeConfig(theta0="a", full="b", fgt="c", out="d", method="task_arithmetic").method == "tv"


def test_bare_hub_ids_mean_the_hub_only_for_inputs_that_are_not_local_paths(tmp_path, monkeypatch):
    from perta_stream.config.merge import MergeConfig
    from perta_stream.sources.input_location import normalize_location

    monkeypatch.chdir(tmp_path)
    assert normalize_location("meta-llama/Llama-3.2-1B") == "hf://meta-llama/Llama-3.2-1B"
    assert normalize_location("org/name@v1.0") == "hf://org/name@v1.0"
    (tmp_path / "models" / "theta0").mkdir(parents=True)
    assert normalize_location("models/theta0") == "models/theta0"  # a local folder wins
    assert normalize_location("a/b/c") == "a/b/c" and normalize_location("./x/y") == "./x/y"
    config = MergeConfig(theta0="models/theta0", full="org/full", fgt="org/fgt@main", out="results/merged")
    assert (config.theta0, config.full, config.fgt) == ("models/theta0", "hf://org/full", "hf://org/fgt@main")
    assert config.out == "results/merged"  # an output is never taken for a Hub repo


def test_dns_failures_are_not_retried():
    import socket

    from perta_stream.sources.hub_http import hub_http_library, is_transient

    http = hub_http_library()  # httpx2 under huggingface_hub 2.x, httpx under 1.x
    try:
        raise http.ConnectError("[Errno -2] Name or service not known") from socket.gaierror(-2, "Name or service not known")
    except http.ConnectError as exc:
        assert not is_transient(exc)
    assert is_transient(http.ConnectError("Connection refused"))


def test_python_dash_m_is_the_command_line():
    run = subprocess.run([sys.executable, "-m", "perta_stream", "--version"], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("perta-stream ")


def test_the_package_lists_its_api_names():
    import perta_stream as ps

    assert {"merge", "stats", "unlearn", "evaluate", "sweep", "finetune"} <= set(ps.__all__)
    assert set(ps.__all__) <= set(dir(ps))
    assert all(callable(getattr(ps, name)) for name in ps.__all__ if name != "__version__")


_API_CONFIGS = {
    "merge": "perta_stream.config.merge:MergeConfig",
    "stats": "perta_stream.config.stats:StatsConfig",
    "unlearn": "perta_stream.config.unlearn:UnlearnConfig",
    "evaluate": "perta_stream.config.eval:EvalConfig",
    "sweep": "perta_stream.config.sweep:SweepConfig",
    "finetune": "perta_stream.config.finetune:FinetuneConfig",
}


def _mistyped(word: str) -> str:
    """The word with its last two letters swapped (`alhpa`-like typos)."""
    return word[:-2] + word[-1] + word[-2]


@pytest.mark.parametrize("function", sorted(_API_CONFIGS))
def test_every_mistyped_keyword_gets_the_right_suggestion(function, tmp_path):
    import importlib

    import perta_stream as ps
    from perta_stream.config.options import COMMON_KEYWORDS, options_of
    from perta_stream.errors import PertaStreamError

    module, name = _API_CONFIGS[function].split(":")
    config = getattr(importlib.import_module(module), name)
    keywords = {meta.keywords()[0] for meta in options_of(config).values()} | set(COMMON_KEYWORDS)
    required = {"merge": ("theta0", "full", "fgt", "out"), "stats": ("model", "forget", "retain"), "evaluate": ("model", "out"), "finetune": ("model", "data", "out")}
    given = {key: str(tmp_path / key) for key in required.get(function, ())}
    for keyword in sorted(keywords):
        typo = _mistyped(keyword)
        if typo == keyword or typo in keywords:
            continue
        with pytest.raises(PertaStreamError) as caught:
            getattr(ps, function)(**given, **{typo: "1"})
        assert f"unknown option {typo!r}; did you mean {keyword!r}?" in str(caught.value), (function, keyword)


def test_quiet_is_a_keyword_of_every_call_and_verbose_says_where_it_went(triplet, tmp_path, monkeypatch):
    import perta_stream as ps
    from perta_stream.errors import PertaStreamError
    from perta_stream.pipelines import merge as merge_pipeline
    from perta_stream.progress import progress_enabled_by_caller

    seen = []
    monkeypatch.setattr(merge_pipeline, "run_merge", lambda config: seen.append(progress_enabled_by_caller()))
    monkeypatch.setattr("perta_stream.progress._enabled_by_caller", True)  # whatever an earlier `main(-q)` left
    theta0, full, fgt = triplet
    ps.merge(theta0=theta0, full=full, fgt=fgt, out=tmp_path / "o", quiet=True)
    ps.merge(theta0=theta0, full=full, fgt=fgt, out=tmp_path / "o")
    assert seen == [False, True] and progress_enabled_by_caller()
    with pytest.raises(PertaStreamError, match="configure logging"):
        ps.merge(theta0=theta0, full=full, fgt=fgt, out=tmp_path / "o", verbose=True)
