"""`perta-stream unlearn`: options from flags and YAML, the example configs, and statistics reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perta_stream.cli import build_parser, main
from perta_stream.config.unlearn import UnlearnConfig, config_command, load_config_file
from perta_stream.errors import StatisticsError, UsageError
from perta_stream.pipelines.unlearn import StatsIdentity, run_unlearn, stats_mismatches
from perta_stream.sources.stats_dir import StatsRecord

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


# ---------------------------------------------------------------- example configs
def test_there_are_example_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_starts_with_the_command_that_runs_it_and_parses(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the command on the first line is run from the repository root
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line == config_command(f"configs/{path.name}")
    # The command on that line must parse, and the file must give a valid config.
    args = build_parser().parse_args(first_line.lstrip("# ").split()[1:])
    config = UnlearnConfig.from_cli(args)
    assert config.method in ("tv", "uniform", "grad", "fisher")
    assert config.alphas


# ---------------------------------------------------------------- options
def _write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_keys_accept_dashes_and_flags_override_them(tmp_path):
    path = _write_yaml(
        tmp_path,
        "theta0: a\nfull: b\nfgt: c\nout: d/{alpha}\nforget: f.jsonl\nretain: r.jsonl\nmethod: grad\n"
        "alpha: [0.5, 2]\nmax-length: 128\nmax_memory: 1GiB\nrecompute-stats: true\n",
    )
    config = UnlearnConfig.from_cli(build_parser().parse_args(["unlearn", "--config", str(path), "--alpha", "3", "--fraction", "0.2"]))
    assert config.method == "grad"
    assert config.alphas == (3.0,)  # the flag wins
    assert config.fraction == 0.2
    assert config.max_length == 128
    assert config.max_memory_bytes == 2**30
    assert config.recompute_stats is True
    assert config.work_folder_path == Path("d") / "perta_work"


def test_flags_alone_work_and_defaults_apply():
    args = build_parser().parse_args(["unlearn", "--theta0", "a", "--full", "b", "--fgt", "c", "--out", "o", "--method", "tv"])
    config = UnlearnConfig.from_cli(args)
    assert (config.alphas, config.fraction, config.max_length, config.kinds) == ((1.0,), 1.0, 512, ("grad", "fisher"))
    assert not config.needs_stats


def test_statistics_compute_options_reach_the_stats_run(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from perta_stream.pipelines import stats as stats_pipeline
    from perta_stream.pipelines import unlearn

    seen = []
    monkeypatch.setattr(stats_pipeline, "run_stats", lambda config: seen.append(config) or SimpleNamespace(summary=lambda: ""))
    (model := tmp_path / "model").mkdir()
    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    forget.write_text("{}\n"), retain.write_text("{}\n")
    path = _write_yaml(tmp_path, f"theta0: {model}\nfull: b\nfgt: c\nout: o\nforget: {forget}\nretain: {retain}\ncheckpoint-interval: 60\n")
    for extra, expected in (([], ("auto", 60.0)), (["--compute-dtype", "bfloat16", "--checkpoint-interval", "0"], ("bfloat16", 0.0))):
        config = UnlearnConfig.from_cli(build_parser().parse_args(["unlearn", "--config", str(path), *extra]))
        unlearn._run_stats(config, str(tmp_path / "stats"), overwrite=False)
        assert (seen[-1].compute_dtype, seen[-1].checkpoint_interval_s) == expected
    without = UnlearnConfig.from_mapping({"theta0": str(model), "full": "b", "fgt": "c", "out": "o", "forget": str(forget), "retain": str(retain)}, where="test")
    unlearn._run_stats(without, str(tmp_path / "stats"), overwrite=False)
    assert seen[-1].checkpoint_interval_s == 300.0  # the stats default
    with pytest.raises(UsageError) as caught:
        UnlearnConfig.from_mapping({"theta0": "a", "full": "b", "fgt": "c", "out": "o", "method": "tv", "checkpoint-interval": -1, "compute-dtype": "fp8"}, where="test")
    assert "--checkpoint-interval must be a number of seconds >= 0" in str(caught.value) and "--compute-dtype 'fp8'" in str(caught.value)


def test_bad_options_are_reported_together(tmp_path):
    path = _write_yaml(tmp_path, "theta0: a\nfull: b\nfgt: c\nout: o\nmethod: fisher\nalpha: -1\nfraction: 2\nbogus: 1\nseed: x\n")
    with pytest.raises(UsageError) as caught:
        UnlearnConfig.from_cli(build_parser().parse_args(["unlearn", "--config", str(path)]))
    message = str(caught.value)
    assert "unknown option 'bogus'" in message and "option 'seed'" in message
    with pytest.raises(UsageError) as caught:
        UnlearnConfig.from_mapping({"theta0": "a", "full": "b", "fgt": "c", "out": "o", "method": "fisher", "alpha": -1, "fraction": 2}, where="test")
    message = str(caught.value)
    assert "--alpha -1.0" in message and "--fraction" in message and "--forget" in message and "--retain" in message


def test_missing_required_and_bad_config_files(tmp_path):
    with pytest.raises(UsageError, match="--theta0 is required"):
        UnlearnConfig.from_mapping({"full": "b", "fgt": "c", "out": "o"}, where="test")
    with pytest.raises(UsageError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="mapping"):
        load_config_file(_write_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config_file(_write_yaml(tmp_path, "a: [1, 2\n"))


def test_cli_reports_bad_config_as_one_line(tmp_path, capsys):
    path = _write_yaml(tmp_path, "theta0: a\nfull: b\n")
    assert main(["unlearn", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--fgt is required" in err


# ---------------------------------------------------------------- statistics identity
def _identity(**changes) -> StatsIdentity:
    base = dict(
        model_header_sha256="m" * 64, model_files=["m", []], forget_sha256="f" * 64, retain_sha256="r" * 64, fraction=1.0, seed=0,
        max_length=512, question_key="question", answer_key="answer", system_prompt=None, kinds=("fisher",),
    )
    base.update(changes)
    return StatsIdentity(**base)


def _record(**changes) -> StatsRecord:
    """A statistics record as `perta_stats.json` holds it (read leniently, as from disk)."""
    record = {
        "format": "perta_stats",
        "model": {"location": "m", "header_sha256": "m" * 64, "files": ["m", []], "model_type": "llama"},
        "kinds": ["grad", "fisher"],
        "datasets": {"forget": {"path": "f", "sha256": "f" * 64}, "retain": {"path": "r", "sha256": "r" * 64}},
        "fraction": 1.0, "seed": 0, "max_length": 512, "question_key": "question", "answer_key": "answer", "system_prompt": None,
    }
    record.update(changes)
    return StatsRecord.from_json(record)


def test_stats_identity_matches_and_more_kinds_are_fine():
    assert stats_mismatches(_record(), _identity()) == []
    assert stats_mismatches(_record(kinds=["fisher"]), _identity()) == []


@pytest.mark.parametrize(
    "record_changes, identity_changes, expected",
    [
        ({"model": {"location": "x", "header_sha256": "z" * 64}}, {}, "another model"),
        ({"datasets": {"forget": {"path": "g", "sha256": "g" * 64}, "retain": {"path": "r", "sha256": "r" * 64}}}, {}, "another forget file"),
        ({}, {"retain_sha256": "q" * 64}, "another retain file"),
        ({"fraction": 0.2}, {}, "fraction 0.2"),
        ({"seed": 1}, {}, "seed 1"),
        ({"max_length": 256}, {}, "max_length 256"),
        ({"answer_key": "a"}, {}, "answer_key 'a'"),
        ({"system_prompt": "Be brief."}, {}, "system_prompt"),
        ({"kinds": ["grad"]}, {}, "not fisher"),
        ({"fraction": None}, {}, "fraction None"),
    ],
)
def test_stats_identity_reports_each_difference(record_changes, identity_changes, expected):
    found = stats_mismatches(_record(**record_changes), _identity(**identity_changes))
    assert len(found) == 1 and expected in found[0]


# ---------------------------------------------------------------- end to end on a tiny model
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """θ_0, θ_full, θ_fgt: one tiny Llama and two perturbed copies, with forget/retain files."""
    import torch

    from perta_stream.demo.model import DemoModelShape, build_demo_model, save_checkpoint
    from perta_stream.demo.tokenizer import train_demo_tokenizer

    root = tmp_path_factory.mktemp("unlearn")
    forget = [{"question": f"Who is author {i}?", "answer": f"Author {i} writes novels about the sea."} for i in range(4)]
    retain = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is about the capital city."} for i in range(6)]
    texts = [text for record in forget + retain for text in record.values()]
    tokenizer = train_demo_tokenizer(texts * 3, vocab_size=320)
    shape = DemoModelShape(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = build_demo_model(tokenizer, shape, seed=0)
    save_checkpoint(model, tokenizer, root / "theta0")
    generator = torch.Generator().manual_seed(1)
    for name, scale in (("full", 0.02), ("fgt", 0.01)):
        perturbed = build_demo_model(tokenizer, shape, seed=0)
        with torch.no_grad():
            for parameter in perturbed.parameters():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        save_checkpoint(perturbed, tokenizer, root / name)
    for name, records in (("forget", forget), ("retain", retain)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


def _config(root: Path, out: str, **changes) -> UnlearnConfig:
    options = dict(
        theta0=str(root / "theta0"), full=str(root / "full"), fgt=str(root / "fgt"), out=str(root / out),
        forget=str(root / "forget.jsonl"), retain=str(root / "retain.jsonl"), stats_dir=str(root / "stats"),
        method="fisher", max_length=64, batch_size=4, device="cpu",
    )
    options.update(changes)
    return UnlearnConfig(**options)


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_unlearn_computes_then_reuses_statistics_and_merges_correctly(tiny_models):
    import torch

    root = tiny_models
    first = run_unlearn(_config(root, "out_a"))
    assert first.stats_reused is False and Path(first.stats_dir).is_dir()
    record_path = Path(first.stats_dir) / "perta_stats.json"
    record_before = record_path.read_bytes()
    stats_files_before = {p: p.stat().st_mtime_ns for p in Path(first.stats_dir).rglob("*.safetensors")}

    # The same inputs with another method and alpha reuse the statistics untouched.
    second = run_unlearn(_config(root, "out_b/{alpha}", method="grad", alphas=(0.5, 2.0)))
    assert second.stats_reused is True
    assert record_path.read_bytes() == record_before
    assert {p: p.stat().st_mtime_ns for p in Path(first.stats_dir).rglob("*.safetensors")} == stats_files_before
    assert len(second.outputs) == 2

    # The merged tensors equal the dense formula with W from the stored statistics.
    theta0, full, fgt = (_tensors(root / name) for name in ("theta0", "full", "fgt"))
    forget_grad, retain_grad = _tensors(Path(first.stats_dir) / "forget.grad"), _tensors(Path(first.stats_dir) / "retain.grad")
    merged = _tensors(Path(second.outputs[1]))
    for tensor_name, value in merged.items():
        a, b = forget_grad[tensor_name].abs(), retain_grad[tensor_name].abs()
        denominator = a + b
        weight = torch.where(denominator > 0, a / torch.where(denominator > 0, denominator, torch.ones_like(denominator)), torch.full_like(a, 0.5))
        expected = full[tensor_name] - 2.0 * weight * (fgt[tensor_name] - theta0[tensor_name])
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


def test_unlearn_refuses_mismatched_statistics_then_recomputes_on_request(tiny_models):
    root = tiny_models
    run_unlearn(_config(root, "out_c", stats_dir=str(root / "stats_c")))
    with pytest.raises(StatisticsError) as caught:
        run_unlearn(_config(root, "out_d", stats_dir=str(root / "stats_c"), fraction=0.5))
    assert "fraction 1.0 instead of 0.5" in str(caught.value) and "--recompute-stats" in str(caught.value)
    assert not (root / "out_d").exists()

    redone = run_unlearn(_config(root, "out_d", stats_dir=str(root / "stats_c"), fraction=0.5, recompute_stats=True))
    assert redone.stats_reused is False
    assert json.loads((root / "stats_c" / "perta_stats.json").read_text())["fraction"] == 0.5


def test_unlearn_tv_needs_no_statistics_and_dry_run_writes_nothing(tiny_models):
    root = tiny_models
    result = run_unlearn(_config(root, "out_tv", method="tv", forget=None, retain=None, stats_dir=None))
    assert result.stats_reused is None and result.stats_dir is None
    assert Path(result.outputs[0]).is_dir()

    dry = run_unlearn(_config(root, "out_dry", stats_dir=str(root / "stats_dry"), dry_run=True))
    assert dry.outputs == () and "compute into" in (dry.plan_text or "")
    assert not (root / "stats_dry").exists() and not (root / "out_dry").exists()


def test_unlearn_cli_from_yaml_reuses_statistics(tiny_models, tmp_path, capsys):
    root = tiny_models
    run_unlearn(_config(root, "out_e", stats_dir=str(root / "stats_e")))
    path = tmp_path / "unlearn.yaml"
    path.write_text(
        "# perta-stream unlearn --config unlearn.yaml\n"
        + "".join(f"{key}: {value}\n" for key, value in {
            "theta0": root / "theta0", "full": root / "full", "fgt": root / "fgt", "out": tmp_path / "merged",
            "forget": root / "forget.jsonl", "retain": root / "retain.jsonl", "stats-dir": root / "stats_e",
            "method": "fisher", "max-length": 64, "batch-size": 4, "device": "cpu",
        }.items()),
        encoding="utf-8",
    )
    assert main(["unlearn", "--config", str(path)]) == 0
    assert "reused statistics" in capsys.readouterr().err
    assert (tmp_path / "merged" / "perta_merge.json").is_file()


def test_the_statistics_record_round_trips_every_key_in_order():
    from perta_stream.sources.stats_dir import StatsRecord

    written = {
        "format": "perta_stats", "format_version": 1, "tool_version": "0",
        "model": {"location": "m", "header_sha256": "h", "files": ["m", []], "content_sha256": "c", "model_type": "llama"},
        "kinds": ["grad", "fisher"], "stats_dtype": "float32", "compute_dtype": "float32", "device": "cpu",
        "datasets": {"forget": {"path": "f", "sha256": "f"}, "retain": {"path": "r", "sha256": "r"}},
        "fraction": 1.0, "seed": 0, "max_length": 512, "question_key": "question", "answer_key": "answer",
        "system_prompt": None, "loss": "answer tokens", "elapsed_s": 1.5, "peak_rss_bytes": 7,
    }  # fmt: skip
    assert list(StatsRecord.from_json(written).to_json().items()) == list(written.items())
    older = StatsRecord.from_json({"format": "perta_stats", "model": "not a mapping", "kinds": "grad"})
    assert older.model.content_sha256 is None and older.kinds == () and older.fraction is None
