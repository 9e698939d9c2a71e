"""`unlearn --one-pass`: the same bytes as `stats` then `merge`, from one sweep.

The reference is the two-pass way through the real CLI (tests/one_pass_fixtures.py); each
one-pass output must equal its merge byte for byte (every shard, the index, the side files, the
model card; perta_merge.json apart from timings and where the statistics came from), for tied
and untied models, grad and fisher in one pass, several α, τ ≠ default, bfloat16 statistics,
and the statistics `--save-stats` writes must equal `stats`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from one_pass_fixtures import alpha_dirs, assert_same_output, data_args, files_of, make_workspace, model_args, two_pass
from perta_stream.cli import main
from perta_stream.config.unlearn import UnlearnConfig
from perta_stream.errors import PlanError, UsageError
from perta_stream.pipelines.unlearn import run_unlearn

REPO = Path(__file__).resolve().parent.parent
# Fields of perta_stats.json that measure the run.
STATS_TIMING_FIELDS = ("elapsed_s", "peak_rss_bytes")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("one-pass"))


def one_pass(ws: dict[str, Path], kind: str, out: Path, methods: list[str], alphas: list[str], *extra: str) -> int:
    return main(["unlearn", "--one-pass", *model_args(ws, kind), *data_args(ws), "--method", ",".join(methods), "--alpha", ",".join(alphas), "--out", str(out), "-q", *extra])


def one_pass_dirs(out: Path, methods: list[str], alphas: list[str]) -> dict[tuple[str, str], Path]:
    base = {methods[0]: out} if len(methods) == 1 else {method: out / method for method in methods}
    return {(method, alpha): folder for method, root in base.items() for alpha, folder in alpha_dirs(root, alphas).items()}


def stats_files(folder: Path) -> dict[str, bytes]:
    files = files_of(folder)
    record = json.loads(files.pop("perta_stats.json"))
    for key in STATS_TIMING_FIELDS:
        record.pop(key)
    files["perta_stats.json"] = json.dumps(record, sort_keys=True).encode()
    return files


CASES = {
    # name: (model, methods, alphas, extra one-pass flags, extra stats flags, tau)
    "tied-grad-and-fisher-two-alphas": ("llama", ["grad", "fisher"], ["0.5", "1"], [], [], None),
    "untied-grad-and-fisher-tau": ("qwen2", ["grad", "fisher"], ["1", "2"], ["--tau", "1.5"], [], "1.5"),
    "tied-fisher-bf16-stats-saved": ("llama", ["fisher"], ["1"], ["--stats-dtype", "bfloat16", "--save-stats"], ["--stats-dtype", "bfloat16"], None),
    "untied-grad-and-tv-saved": ("qwen2", ["grad", "tv"], ["2"], ["--save-stats"], [], None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_pass_equals_stats_then_merge_byte_for_byte(workspace, tmp_path, name):
    kind, methods, alphas, extra, stats_extra, tau = CASES[name]
    stat_methods = [m for m in methods if m in ("grad", "fisher")]
    reference = two_pass(workspace, kind, tmp_path / "two", stat_methods, alphas, *stats_extra, tau=tau)
    if "tv" in methods:
        reference["tv"] = tmp_path / "two" / "tv"
        assert main(["merge", *model_args(workspace, kind), "--method", "tv", "--alpha", ",".join(alphas), "--out", str(reference["tv"]), "-q"]) == 0
    if "--save-stats" in extra:
        extra = [*extra, str(tmp_path / "saved")]
    out = tmp_path / "one"
    assert one_pass(workspace, kind, out, methods, alphas, *extra) == 0
    for (method, alpha), folder in one_pass_dirs(out, methods, alphas).items():
        assert_same_output(folder, alpha_dirs(reference[method], alphas)[alpha])
        assert main(["verify", str(folder), "-q"]) == 0
    if "--save-stats" in extra:
        assert stats_files(tmp_path / "saved") == stats_files(tmp_path / "two" / "stats")
    # Nothing of the sweep is left behind: no statistics, no resume files, no partial folders.
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".perta") or p.name.endswith((".partial", ".inprogress", ".tmp"))]
    assert not leftovers


def test_merging_in_the_background_gives_the_same_bytes(workspace, tmp_path, monkeypatch):
    # The CUDA way (the merge overlaps the next layer's compute), run on CPU.
    from perta_stream.pipelines import one_pass as one_pass_pipeline

    monkeypatch.setattr(one_pass_pipeline, "merge_in_background", lambda device_type: True)
    reference = two_pass(workspace, "llama", tmp_path / "two", ["grad", "fisher"], ["1"])
    assert one_pass(workspace, "llama", tmp_path / "one", ["grad", "fisher"], ["1"], "--checkpoint-interval", "0") == 0
    for method in ("grad", "fisher"):
        assert_same_output(tmp_path / "one" / method, reference[method])


def test_the_gpu_ways_merge_step_gives_the_same_bytes(workspace, tmp_path, monkeypatch):
    # The CUDA way's merge step run on CPU: inputs staged into (device) buffers in chunks of the
    # GPU's size (here small and dividing no tensor), one kernel block per chunk, in the background.
    from perta_stream.pipelines import group_merge
    from perta_stream.pipelines import one_pass as one_pass_pipeline

    monkeypatch.setattr(group_merge, "merges_in_device_chunks", lambda device: True)
    monkeypatch.setattr(group_merge, "DEVICE_CHUNK_ELEMENTS", 3001)
    monkeypatch.setattr(one_pass_pipeline, "merge_in_background", lambda device_type: True)
    alphas = ["0.5", "1"]
    reference = two_pass(workspace, "llama", tmp_path / "two", ["grad", "fisher"], alphas, "--stats-dtype", "bfloat16")
    assert one_pass(workspace, "llama", tmp_path / "one", ["grad", "fisher"], alphas, "--stats-dtype", "bfloat16") == 0
    for method in ("grad", "fisher"):
        for alpha, folder in alpha_dirs(tmp_path / "one" / method, alphas).items():
            assert_same_output(folder, alpha_dirs(reference[method], alphas)[alpha])


def test_statistics_at_another_model_give_the_same_bytes(workspace, tmp_path):
    # Statistics at θ_full: the merge step must read θ_0 from disk, not take the sweep's weights.
    reference = two_pass(workspace, "qwen2", tmp_path / "two", ["fisher"], ["1"], stats_model="full")
    assert one_pass(workspace, "qwen2", tmp_path / "one", ["fisher"], ["1"], "--stats-model", str(workspace["qwen2.full"])) == 0
    assert_same_output(tmp_path / "one", reference["fisher"])


def test_dry_run_compares_one_pass_with_two_passes_and_writes_nothing(workspace, tmp_path, capsys):
    out = tmp_path / "one"
    assert one_pass(workspace, "llama", out, ["grad", "fisher"], ["1"], "--dry-run") == 0
    text = capsys.readouterr().out
    assert "one pass vs two passes" in text and "scratch disk" in text and "merge plan" in text and "statistics plan" in text
    assert not list(tmp_path.iterdir())


def _figure(text: str, label: str) -> tuple[str, str]:
    line = next(line for line in text.splitlines() if line.strip().startswith(label))
    parts = line.split()
    return " ".join(parts[-4:-2]), " ".join(parts[-2:])


def _bytes(figure: str) -> int:
    from perta_stream.sizes import parse_size

    return parse_size(figure, what="figure")


def test_config_only_plan_of_the_70b_model(workspace, capsys):
    from perta_stream.plan.stats_plan import ModelShape

    config_path = REPO / "configs" / "llama-70b-config.json"
    args = ["unlearn", "--one-pass", "--dry-run", "--config-only", "--theta0", str(config_path), "--full", "x", "--fgt", "y", "--out", "o"]
    assert main([*args, *data_args(workspace)[:4], "--method", "grad,fisher", "--device", "cuda", "--fraction", "0.2"]) == 0
    text = capsys.readouterr().out
    one_written, two_written = _figure(text, "bytes written")
    assert "one pass vs two passes" in text
    shape = ModelShape.from_config(json.loads(config_path.read_text()))
    numel = sum(math.prod(dims) for dims in shape.tensor_shapes().values())
    # Two passes write four float32 statistics of every parameter; one pass writes none.
    stats_tib = 4 * numel * 4 / 2**40
    assert two_written.endswith("TiB") and float(two_written.split()[0]) >= stats_tib
    assert not one_written.endswith("TiB")


@pytest.mark.parametrize(("method", "tau", "on_gpu"), [("fisher", None, True), ("fisher", "1", True), ("grad", "2", True), ("grad", "3", False), ("fisher", "3", False)])
def test_the_70b_plan_merges_on_the_gpu_only_where_its_arithmetic_is_the_cpus(workspace, capsys, method, tau, on_gpu):
    # On the GPU the group's statistics wait on the device (not on the host) until merged; that
    # is done only where every weight exponent is 0.5, 1 or 2 (bitwise the CPU's pow).
    config_path = REPO / "configs" / "llama-70b-config.json"
    args = ["unlearn", "--one-pass", "--dry-run", "--config-only", "--theta0", str(config_path), "--full", "x", "--fgt", "y", "--out", "o"]
    args += [*data_args(workspace)[:4], "--method", method, "--device", "cuda", "--fraction", "0.2"]
    figures = {}
    for name, extra in (("tau", ["--tau", tau] if tau else []), ("cpu merge", ["--tau", "3"])):
        assert main([*args, *extra]) == 0
        text = capsys.readouterr().out.split("one pass vs two passes")[1]
        figures[name] = [_bytes(_figure(text, label)[0]) for label in ("peak host RAM", "peak cuda memory")]
    (host_one, device_one), (cpu_host_one, cpu_device_one) = figures["tau"], figures["cpu merge"]
    largest_group = 128256 * 8192  # the head: its float32 statistics decide where the extra memory is
    if on_gpu:
        # The page-locked chunk buffers (128 MiB here) and the printed rounding take a little back.
        assert device_one - cpu_device_one >= 2 * 4 * largest_group and cpu_host_one - host_one >= 4 * largest_group - 2**28
    else:
        assert (host_one, device_one) == (cpu_host_one, cpu_device_one)


def test_the_plan_counts_the_kernel_scratch_the_cpu_merge_allocates():
    # plan/ restates the kernel's block size (it imports no torch code); the dry run's memory
    # figure is only right while both agree.
    import torch

    from perta_stream.compute.merge_kernel import MergeKernel
    from perta_stream.pipelines.group_merge import kernel_block_elements
    from perta_stream.plan.one_pass_plan import KERNEL_SCRATCH_BYTES

    kernel = MergeKernel(method="fisher", alphas=(1.0,), tau=2.0, uniform_weight=1.0, fallback_weight=0.5, stat_roles=("f", "r"), block_elements=kernel_block_elements(torch.device("cpu")))
    scratch = [value for value in vars(kernel).values() if isinstance(value, torch.Tensor)]
    assert sum(tensor.nbytes for tensor in scratch) == KERNEL_SCRATCH_BYTES


def test_bad_inputs_are_all_reported_before_anything_is_written(workspace, tmp_path):
    out = workspace["llama.full"] / "inside"  # an output inside an input
    options = dict(theta0=str(workspace["llama.theta0"]), full=str(workspace["llama.full"]), fgt=str(workspace["qwen2.fgt"]))
    missing = tmp_path / "missing.jsonl"
    config = UnlearnConfig(**options, out=str(out), method="grad,fisher", forget=str(missing), retain=str(workspace["retain"]), one_pass=True, device="cpu")
    with pytest.raises(PlanError) as caught:
        run_unlearn(config)
    problems = "\n".join(caught.value.problems)
    assert "overlaps the full input" in problems
    assert f"--forget {missing} is not a file" in problems
    assert "tying mismatch" in problems or "shape" in problems or "missing" in problems
    assert not out.exists() and not Path(str(out) + ".partial").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="grad,fisher"), "needs --one-pass"),
        (dict(method="grad", save_stats="s"), "--save-stats applies to --one-pass"),
        (dict(method="grad", one_pass=True, config_only=True), "needs --dry-run"),
        (dict(method="grad", one_pass=True, stats_dir="s"), "two-pass way"),
        (dict(method="tv", one_pass=True), "needs no statistics"),
        (dict(method="grad,grad", one_pass=True), "same method twice"),
        (dict(method="grad", one_pass=True, out="hf://org/x", resume=True), "which does not outlive the run"),
        (dict(method="grad,fisher", one_pass=True, out="hf://org/x"), "need a {method} placeholder"),
        (dict(method="grad", one_pass=True, save_stats="hf://org/s"), "local statistics directory"),
        (dict(method="grad", one_pass=True, hub_create_repo=True), "--create-repo only applies to an hf:// --out"),
    ],
)
def test_one_pass_options_are_checked(options, message):
    base = dict(theta0="a", full="b", fgt="c", out="o", forget="f", retain="r")
    with pytest.raises(PlanError) as caught:
        UnlearnConfig(**{**base, **options})
    assert message in str(caught.value)


def test_cli_accepts_several_methods_only_with_one_pass(capsys):
    assert main(["unlearn", "--theta0", "a", "--full", "b", "--fgt", "c", "--out", "o", "--forget", "f", "--retain", "r", "--method", "grad,fisher"]) != 0
    assert "needs --one-pass" in capsys.readouterr().err
    with pytest.raises(UsageError):
        UnlearnConfig.from_mapping({"theta0": "a", "full": "b", "fgt": "c", "out": "o", "method": "nope", "one_pass": True}, where="test")


def test_one_pass_under_a_launcher_is_refused(workspace, tmp_path, monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    config = UnlearnConfig(
        theta0=str(workspace["llama.theta0"]), full=str(workspace["llama.full"]), fgt=str(workspace["llama.fgt"]), out=str(tmp_path / "o"),
        method="fisher", forget=str(workspace["forget"]), retain=str(workspace["retain"]), one_pass=True, device="cpu",
    )
    with pytest.raises(UsageError, match="one process"):
        run_unlearn(config)
    assert not list(tmp_path.iterdir())


def test_summary_says_one_pass(workspace, tmp_path):
    config = UnlearnConfig(
        theta0=str(workspace["qwen2.theta0"]), full=str(workspace["qwen2.full"]), fgt=str(workspace["qwen2.fgt"]), out=str(tmp_path / "o"),
        method="grad", forget=str(workspace["forget"]), retain=str(workspace["retain"]), one_pass=True, device="cpu", batch_size=4,
    )
    result = run_unlearn(config)
    assert result.outputs == (str(tmp_path / "o"),)
    assert result.summary().startswith("one pass: statistics and merge into")
