"""Nothing lost, nothing leaked: the careless- and hostile-input cases of the safety review.

Each case runs the real command line (in-process `main`, or a child process where a signal or
standard input matters) and checks what must never happen: an input deleted or changed, a file
from outside a checkpoint copied into an output, code from a model folder run, a wrong or NaN
model written with exit 0, or a traceback where one error line belongs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge_fixtures import content_digest, load_checkpoint, write_checkpoint, write_stats
from perta_stream.cli import main
from reliability_fixtures import cli_env, merge_args, partial_of, run_cli, tree_digest

SECRET = "HF_TOKEN=hf_secret_that_must_not_leak"


def _error_line(capsys, args: list[str]) -> str:
    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and lines and lines[-1].startswith("error: "), lines
    assert sum(line.startswith("error:") for line in lines) == 1, lines
    return lines[-1]


# ------------------------------------------------------------------ 1. side files linked outside
def test_side_file_linked_outside_the_checkpoint_is_refused_and_never_copied(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    secret = tmp_path / "environ"
    secret.write_text(SECRET)
    (full / "tokenizer_config.json").unlink(missing_ok=True)
    os.symlink(secret, full / "tokenizer_config.json")
    out = tmp_path / "out"
    message = _error_line(capsys, merge_args(theta0, full, fgt, out))
    assert "tokenizer_config.json is a symbolic link" in message and "outside the checkpoint" in message
    assert not out.exists() and not partial_of(out).exists()


def test_side_file_linked_inside_the_checkpoint_is_copied(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    (full / "real_notes.txt").write_text("notes")
    os.symlink("real_notes.txt", full / "notes.txt")
    out = tmp_path / "out"
    assert main(merge_args(theta0, full, fgt, out)) == 0
    assert (out / "notes.txt").read_text() == "notes" and not (out / "notes.txt").is_symlink()


def test_convert_refuses_side_files_linked_outside(tmp_path, capsys):
    model = tmp_path / "pickled"
    model.mkdir()
    torch.save({"w": torch.ones(2)}, model / "pytorch_model.bin")
    secret = tmp_path / "environ"
    secret.write_text(SECRET)
    os.symlink(secret, model / "config.json")
    message = _error_line(capsys, ["convert", str(model), "--out", str(tmp_path / "out"), "--allow-pickle"])
    assert "config.json is a symbolic link" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 2. --overwrite removes only its own
def test_overwrite_never_deletes_an_input_named_like_a_temporary_sibling(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    out = tmp_path / "out"
    assert main(merge_args(theta0, full, fgt, out)) == 0
    # An input that happens to be called <out>.replaced, the old fixed name of the trash folder.
    replaced = Path(shutil.copytree(full, tmp_path / "out.replaced"))
    before = tree_digest(replaced)
    assert main(merge_args(theta0, replaced, fgt, out, "--overwrite")) == 0
    assert tree_digest(replaced) == before
    assert not list(tmp_path.glob("out.replaced-*"))  # the run's own trash folder is gone


def test_overwrite_replaces_only_an_earlier_output_or_an_empty_folder(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    message = _error_line(capsys, merge_args(theta0, full, fgt, foreign, "--overwrite"))
    assert "holds no perta_merge.json" in message
    assert (foreign / "thesis.tex").read_text() == "years of work"
    # A statistics output is not a merge output either.
    stats_like = tmp_path / "stats_like"
    stats_like.mkdir()
    (stats_like / "perta_stats.json").write_text(json.dumps({"format": "perta_stats"}))
    assert "holds no perta_merge.json" in _error_line(capsys, merge_args(theta0, full, fgt, stats_like, "--overwrite"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(merge_args(theta0, full, fgt, empty, "--overwrite")) == 0
    assert (empty / "perta_merge.json").is_file()


def test_a_partial_folder_that_is_an_input_is_never_touched(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    as_partial = Path(shutil.copytree(full, tmp_path / "out.partial"))
    before = tree_digest(as_partial)
    for extra in ((), ("--overwrite",), ("--resume",)):
        message = _error_line(capsys, merge_args(theta0, as_partial, fgt, tmp_path / "out", *extra))
        assert "working folder" in message
    assert tree_digest(as_partial) == before


def test_a_foreign_partial_folder_is_neither_resumed_nor_removed(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    foreign = tmp_path / "out.partial"
    foreign.mkdir()
    (foreign / "data.txt").write_text("someone's")
    message = _error_line(capsys, merge_args(theta0, full, fgt, tmp_path / "out", "--resume"))
    assert "not made by perta-stream" in message
    assert (foreign / "data.txt").read_text() == "someone's"


def test_sweep_overwrite_refuses_a_full_model_at_its_partial_path(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    as_partial = Path(shutil.copytree(full, tmp_path / "sweep.partial"))
    before = tree_digest(as_partial)
    args = ["sweep", "--theta0", str(theta0), "--full", str(as_partial), "--fgt", str(fgt), "--out", str(tmp_path / "sweep")]
    message = _error_line(capsys, [*args, "--methods", "tv", "--retain-model", str(full), "--overwrite", "-q"])
    assert "working folder" in message
    assert tree_digest(as_partial) == before


# ------------------------------------------------------------------ 3. unlearn --stats-dir at a model
def test_unlearn_never_replaces_a_model_given_as_stats_dir(triplet, tmp_path, capsys):
    from stats_fixtures import save_tiny_model, write_data

    model = save_tiny_model(tmp_path / "models", "llama")
    victim = Path(shutil.copytree(model, tmp_path / "victim"))
    forget, retain = write_data(tmp_path / "data")
    before = tree_digest(victim)
    args = ["unlearn", "--theta0", str(model), "--full", str(model), "--fgt", str(model), "--out", str(tmp_path / "out"),
            "--forget", str(forget), "--retain", str(retain), "--stats-dir", str(victim), "--device", "cpu", "-q"]
    assert "does not match" in _error_line(capsys, args)
    message = _error_line(capsys, [*args, "--recompute-stats"])
    assert "holds no perta_stats.json" in message
    assert tree_digest(victim) == before


# ------------------------------------------------------------------ 4. statistics identity by content
def test_merge_refuses_statistics_of_another_model_with_the_same_headers(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    stats = write_stats(tmp_path / "stats", fgt)  # same architecture, same headers, other bytes
    out = tmp_path / "out"
    message = _error_line(capsys, merge_args(theta0, full, fgt, out, "--method", "fisher", "--stats", str(stats)))
    assert "whose tensors differ" in message and "nothing was committed" in message
    assert not out.exists()
    # Declared as taken at theta_fgt, the same statistics pass (the merged shards are kept for
    # --resume: W does not depend on where the statistics were taken), and the record says so.
    assert main(merge_args(theta0, full, fgt, out, "--method", "fisher", "--stats", str(stats), "--stats-at", "fgt", "--resume")) == 0
    record = json.loads((out / "perta_merge.json").read_text())
    assert record["stats_at"] == "fgt" and record["stats_content_sha256"] == content_digest(fgt)


def test_statistics_without_a_content_digest_are_refused(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    stats = write_stats(tmp_path / "stats", theta0)
    record = json.loads((stats / "perta_stats.json").read_text())
    del record["model"]["content_sha256"]
    (stats / "perta_stats.json").write_text(json.dumps(record))
    message = _error_line(capsys, merge_args(theta0, full, fgt, tmp_path / "out", "--method", "grad", "--stats", str(stats)))
    assert "does not record the content digest" in message


def test_stats_records_the_content_digest_the_merge_checks(tmp_path):
    from stats_fixtures import save_tiny_model, write_data

    model = save_tiny_model(tmp_path / "models", "llama")
    forget, retain = write_data(tmp_path / "data")
    out = tmp_path / "stats"
    assert main(["stats", "--model", str(model), "--forget", str(forget), "--retain", str(retain), "--out", str(out), "--device", "cpu", "-q"]) == 0
    assert json.loads((out / "perta_stats.json").read_text())["model"]["content_sha256"] == content_digest(model)


def test_merge_under_resume_still_checks_the_statistics(triplet, tmp_path, capsys, monkeypatch):
    """Shards finished before a crash are not read again; their theta0 tensors are hashed at the end."""
    from perta_stream.sinks import model_output

    theta0, full, fgt = triplet
    stats = write_stats(tmp_path / "stats", full)
    out = tmp_path / "out"
    args = merge_args(theta0, full, fgt, out, "--method", "fisher", "--stats", str(stats))
    calls = {"n": 0}
    original = model_output.LocalModelOutput.shard_finished

    def crash_after_first(self, record):  # noqa: ANN001
        original(self, record)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(model_output.LocalModelOutput, "shard_finished", crash_after_first)
    assert main(args) == 130
    capsys.readouterr()
    monkeypatch.setattr(model_output.LocalModelOutput, "shard_finished", original)
    assert "whose tensors differ" in _error_line(capsys, [*args, "--resume"])
    assert main([*args, "--resume", "--stats-at", "full"]) == 0


# ------------------------------------------------------------------ 5. no code from a model folder
@pytest.mark.parametrize("command", ["eval", "stats"])
def test_python_files_of_a_model_folder_never_run_whatever_stdin_says(command, tmp_path):
    from stats_fixtures import save_tiny_model, write_data

    model = save_tiny_model(tmp_path / "models", "llama")
    marker = tmp_path / "code_ran"
    (model / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = json.loads((model / "config.json").read_text())
    model_config["auto_map"] = {"AutoModelForCausalLM": "evil_tokenizer.EvilTokenizer"}
    (model / "config.json").write_text(json.dumps(model_config))
    forget, retain = write_data(tmp_path / "data")
    if command == "eval":
        args = ["eval", "--model", str(model), "--split", "forget01", "--out", str(tmp_path / "e.json"), "--max-items", "1", "--device", "cpu"]
    else:
        args = ["stats", "--model", str(model), "--forget", str(forget), "--retain", str(retain), "--out", str(tmp_path / "s"), "--device", "cpu"]
    env = cli_env()
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-m", "perta_stream.cli", *args, "-q"], input="y\ny\ny\n", env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), run.stderr
    # Whatever the outcome, never a traceback: a refusal is one error line.
    assert "Traceback" not in run.stderr, run.stderr


# ------------------------------------------------------------------ 6. the final rename, checked first
def test_output_that_is_a_dangling_symlink_is_refused_before_any_work(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    link = tmp_path / "out"
    os.symlink(tmp_path / "nowhere", link)
    assert "is a symbolic link" in _error_line(capsys, merge_args(theta0, full, fgt, link))
    assert not partial_of(link).exists() and link.is_symlink()


def test_output_that_is_a_mount_point_is_refused_before_any_work(triplet, tmp_path, capsys, monkeypatch):
    theta0, full, fgt = triplet
    out = tmp_path / "mounted"
    out.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out or real_ismount(path))
    message = _error_line(capsys, merge_args(theta0, full, fgt, out, "--overwrite"))
    assert "mount point" in message and not partial_of(out).exists()


def test_a_bind_mount_of_the_same_file_system_is_found_in_the_mount_table(triplet, tmp_path, capsys, monkeypatch):
    from perta_stream.sinks import output_dir

    theta0, full, fgt = triplet
    out = tmp_path / "bind mounted"  # a space: the table writes it as \\040
    out.mkdir()
    (out / "perta_merge.json").write_text(json.dumps({"format": "perta_merge"}))  # an earlier merge's output
    table = tmp_path / "mountinfo"
    escaped = str(out.resolve()).replace(" ", "\\040")
    table.write_text(f"36 25 254:0 / / rw,relatime - ext4 /dev/vda rw\n45 36 254:0 {tmp_path}/source {escaped} rw,relatime - ext4 /dev/vda rw\n")
    monkeypatch.setattr(output_dir, "MOUNTINFO_PATH", str(table))
    assert not os.path.ismount(out)  # what the device comparison says of a same-file-system bind mount
    message = _error_line(capsys, merge_args(theta0, full, fgt, out, "--overwrite"))
    assert "mount point" in message and not partial_of(out).exists()


def test_a_real_bind_mount_as_out_is_refused_before_any_work(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    source, out = tmp_path / "source", tmp_path / "mounted"
    source.mkdir(), out.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(out)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts need privileges this test runs without")
    try:
        message = _error_line(capsys, merge_args(theta0, full, fgt, out, "--overwrite"))
        assert "mount point" in message and not partial_of(out).exists()
    finally:
        subprocess.run(["umount", str(out)], check=True)


@pytest.mark.parametrize("out", [".", "..", ""])
def test_output_that_names_no_folder_is_one_error_line(triplet, out, capsys):
    theta0, full, fgt = triplet
    assert "does not name a new folder" in _error_line(capsys, merge_args(theta0, full, fgt, Path(out) if out else ""))


# ------------------------------------------------------------------ 7. shard names with ./
def test_index_entries_with_a_dot_slash_prefix_are_normalized(triplet, tmp_path):
    theta0, full, fgt = triplet
    index_path = full / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {name: f"./{file_name}" for name, file_name in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    assert main(merge_args(theta0, full, fgt, out)) == 0
    written = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert all("/" not in file_name and (out / file_name).is_file() for file_name in written.values())
    assert main(["verify", str(out), "-q"]) == 0


def test_index_entries_in_a_sub_folder_are_refused_in_the_plan(triplet, tmp_path, capsys):
    theta0, full, fgt = triplet
    index_path = full / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "sub/" + index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    assert "not a file directly in the checkpoint" in _error_line(capsys, merge_args(theta0, full, fgt, tmp_path / "out"))


# ------------------------------------------------------------------ 8. W at extreme magnitudes
def _weights(forget: list[float], retain: list[float], *, method: str, tau: float, fallback: float = 0.5) -> torch.Tensor:
    from perta_stream.compute.weights import compute_weights

    count = len(forget)
    buffers = [torch.empty(count) for _ in range(4)]
    return compute_weights(
        torch.tensor(forget), torch.tensor(retain), method=method, tau=tau, fallback_weight=fallback,
        out=buffers[0], scratch=buffers[1], spare=buffers[2], other=buffers[3],
    ).clone()


def _exact_weight(forget: float, retain: float, *, method: str, tau: float, fallback: float = 0.5) -> float:
    """W in exact arithmetic (Python floats via logarithms, no overflow): s_f^e / (s_f^e + s_r^e)."""
    s_f, s_r = (abs(forget), abs(retain)) if method == "grad" else (forget, retain)
    if s_f == 0 and s_r == 0:
        return fallback
    if s_f == 0 or s_r == 0:
        return 1.0 if s_r == 0 else 0.0
    exponent = tau if method == "grad" else tau / 2
    log_ratio = exponent * (math.log(s_r) - math.log(s_f))
    return 1.0 / (1.0 + math.exp(log_ratio)) if log_ratio < 700 else 0.0


def test_weights_of_the_review_cases():
    # fisher 1e3 with tau 30: the textbook form overflows to inf/inf = NaN.
    weights = _weights([1e3, 1e3, 2e3], [1e3, 2e3, 1e3], method="fisher", tau=30)
    assert torch.isfinite(weights).all()
    assert weights[0] == 0.5 and weights[1] < 1e-4 and weights[2] > 1 - 1e-4
    # F_f = 1e-12, F_r = 1e-14, tau 8: the textbook form underflows to 0/0 = the fallback 0.5.
    assert _weights([1e-12], [1e-14], method="fisher", tau=8)[0] == pytest.approx(1 - 1e-8, abs=1e-7)


@pytest.mark.parametrize("method", ["grad", "fisher"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 8.0, 30.0])
def test_weights_equal_the_exact_quotient_at_every_magnitude(method, tau):
    generator = torch.Generator().manual_seed(int(tau * 10) + (method == "grad"))
    exponents = torch.randint(-44, 38, (2, 2000), generator=generator).float()
    mantissas = torch.rand((2, 2000), generator=generator) + 0.5
    signs = torch.where(torch.rand((2, 2000), generator=generator) < 0.5, -1.0, 1.0) if method == "grad" else 1.0
    values = (signs * mantissas * 10.0**exponents).float()
    values[:, :50] = 0.0  # both zero: the fallback
    values[0, 50:100] = 0.0  # forget zero: W = 0
    values[1, 100:150] = 0.0  # retain zero: W = 1
    forget, retain = values[0].tolist(), values[1].tolist()
    weights = _weights(forget, retain, method=method, tau=tau, fallback=0.25)
    assert torch.isfinite(weights).all() and (weights >= 0).all() and (weights <= 1).all()
    for k, (f, r) in enumerate(zip(forget, retain)):
        exact = _exact_weight(f, r, method=method, tau=tau, fallback=0.25)
        # A few float32 roundings (the ratio's relative error is amplified by the exponent e:
        # dW/W = (1 - W) e dr/r), plus float32's smallest step for results near 0.
        exponent = tau if method == "grad" else tau / 2
        bound = 4 * 2**-24 * (2 + exponent) * exact + 2e-45
        assert abs(float(weights[k]) - exact) <= bound, (f, r, float(weights[k]), exact)


# ------------------------------------------------------------------ 9. eval --out
def test_eval_out_refuses_existing_files_and_files_inside_the_model(tmp_path):
    from perta_stream.config.eval import EvalConfig
    from perta_stream.errors import PlanError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    with pytest.raises(PlanError, match="already exists; pass --overwrite"):
        EvalConfig(model=str(model), split="forget01", out=str(existing))
    EvalConfig(model=str(model), split="forget01", out=str(existing), overwrite=True)
    for target in (model / "config.json", model / "eval.json"):
        with pytest.raises(PlanError, match="inside the --model folder"):
            EvalConfig(model=str(model), split="forget01", out=str(target), overwrite=True)
    (model / "config.md").write_text("mine")
    with pytest.raises(PlanError, match="inside the --model folder"):
        EvalConfig(model=str(model), split="forget01", out=str(tmp_path / "elsewhere" / ".." / "model" / "config.json"), overwrite=True)
    assert (model / "config.json").read_text() == "{}" and (model / "config.md").read_text() == "mine"


# ------------------------------------------------------------------ 10. non-finite values, SIGTERM, Hub bytes
@pytest.mark.parametrize("role", ["full", "theta0", "stats"])
def test_non_finite_inputs_stop_the_merge_unless_allowed(good, tmp_path, capsys, role):
    theta0, full, fgt = (Path(shutil.copytree(path, tmp_path / path.name)) for path in good)
    stats = write_stats(tmp_path / "stats", theta0)
    target = {"full": full, "theta0": theta0, "stats": stats / "forget.fisher"}[role]
    tensors = load_checkpoint(target)
    name = sorted(tensors)[1]
    tensors[name].view(-1)[5] = float("nan") if role != "theta0" else float("inf")
    for path in target.glob("*.safetensors"):
        path.unlink()
    write_checkpoint(target, tensors, shards=3 if role != "stats" else 2)
    if role == "theta0":
        stats = write_stats(tmp_path / "stats2", theta0)
    args = merge_args(theta0, full, fgt, tmp_path / "out", "--method", "fisher", "--stats", str(stats))
    message = _error_line(capsys, args)
    assert name in message and "NaN or infinite" in message and "--allow-nonfinite" in message
    assert {"full": "full", "theta0": "theta0", "stats": "forget.fisher"}[role] in message
    assert not (tmp_path / "out").exists()
    assert main([*args, "--allow-nonfinite", "--resume"]) == 0


def test_sigterm_is_one_error_line_and_leaves_no_temporary_file(good, tmp_path):
    theta0, full, fgt = good
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from perta_stream.sinks import shard_writer\n"
        "original = shard_writer.ShardWriter.write\n"
        "def write(self, data):\n"
        "    original(self, data)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "shard_writer.ShardWriter.write = write\n"
        "from perta_stream.cli import main\n"
        f"sys.exit(main({merge_args(theta0, full, fgt, out)!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: terminated (SIGTERM)") and "Traceback" not in run.stderr
    assert not out.exists() and partial_of(out).is_dir()
    assert not [p for p in partial_of(out).rglob("*") if p.name.endswith(".tmp")]
    resumed = run_cli([*merge_args(theta0, full, fgt, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr


def test_non_utf8_data_file_is_one_error_line(tmp_path, capsys):
    from stats_fixtures import save_tiny_model

    model = save_tiny_model(tmp_path / "models", "llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "\xff", "answer": "b"}\n')
    message = _error_line(capsys, ["stats", "--model", str(model), "--forget", str(bad), "--retain", str(bad), "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert "line 2: not UTF-8" in message
