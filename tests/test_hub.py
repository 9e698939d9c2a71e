"""Hub-to-Hub merges against a loopback Hub (tests/hub_server.py), driven by the real huggingface_hub client.

The loopback server speaks the Hub's HTTP API (repo info, resolve with Range and CDN redirects,
preupload, LFS batch and upload, commit), so these tests exercise huggingface_hub's own request
code, headers and error mapping; only the network is fake.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hub_server import HubServer
from merge_fixtures import make_triplet, output_bits, reference_merge
from perta_stream.config.merge import MergeConfig
from perta_stream.errors import HubError, PlanError
from perta_stream.pipelines.merge import run_merge
from perta_stream.sources import hub_http
from perta_stream.sources.hub_http import RetryPolicy

WRITE_TOKEN = "hf_write_0123456789abcdef"
READ_TOKEN = "hf_read_0123456789abcdef"
SMALL_CHUNK_BYTES = 4096


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_models")
    theta0, full, fgt = make_triplet(root, tied=True, dtype=torch.bfloat16)
    return root, theta0, full, fgt


@pytest.fixture(scope="module")
def server(models):
    hub = HubServer(tokens={WRITE_TOKEN: True, READ_TOKEN: False})
    _, theta0, full, fgt = models
    hub.publish_folder("org/theta0", theta0)
    hub.publish_folder("org/full", full, private=True)
    hub.publish_folder("org/fgt", fgt)
    yield hub
    hub.stop()


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    """Point huggingface_hub at the loopback server for one test (its constants are read at import)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.setattr(hub_http, "RETRY_POLICY", RetryPolicy(attempts=4, base_wait_s=0.01, max_wait_s=0.05))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    (tmp_path / "tmp").mkdir()
    server.clear_faults()
    server.reset_counters()
    yield server
    server.clear_faults()
    if not bars_were_disabled:
        enable_progress_bars()


def _config(out: str, **options) -> MergeConfig:
    base = dict(theta0="hf://org/theta0", full="hf://org/full", fgt="hf://org/fgt", out=out, chunk_bytes=SMALL_CHUNK_BYTES)
    base.update(options)
    return MergeConfig(**base)


@pytest.fixture(scope="module")
def local_merge(models, tmp_path_factory):
    """The same merge from the local directories: what every Hub run must reproduce byte for byte."""
    root, theta0, full, fgt = models
    out = tmp_path_factory.mktemp("local") / "out"
    run_merge(MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(out), chunk_bytes=SMALL_CHUNK_BYTES, alphas=(1.5,)))
    return out


def _staging_dirs(tmp_root: Path) -> list[Path]:
    return sorted(tmp_root.glob("perta-hub-out-*"))


def test_hub_to_hub_merge_equals_local_merge_byte_for_byte(hub, models, local_merge, tmp_path):
    _, theta0, full, fgt = models
    commits_before = hub.commit_count
    result = run_merge(_config("hf://org/merged", alphas=(1.5,), hub_create_repo=True))
    assert hub.commit_count == commits_before + 1  # one commit holds the whole model
    assert result.outputs[0].startswith("hf://org/merged@")
    pushed = hub.files("org/merged")
    local = {p.name: p.read_bytes() for p in local_merge.iterdir()}
    for name, data in local.items():
        if name not in ("README.md", "perta_merge.json"):
            assert pushed[name] == data, name  # shards, index and side files, byte for byte
    assert set(pushed) == set(local) | {".gitattributes"}
    record = json.loads(pushed["perta_merge.json"])
    assert record["inputs"]["full"]["location"].startswith("hf://org/full@")
    assert record["shards"] == json.loads(local["perta_merge.json"])["shards"]
    assert "base_model: org/full" in pushed["README.md"].decode()
    # The pushed bytes also equal the dense reference computed from the local inputs.
    out = tmp_path / "pushed"
    out.mkdir()
    for name, data in pushed.items():
        (out / name).write_bytes(data)
    expected = reference_merge(theta0, full, fgt, method="tv", alpha=1.5)
    actual = output_bits(out)
    for name, bits in expected.items():
        np.testing.assert_array_equal(actual[name], bits, err_msg=name)
    assert hub.cdn_requests_with_auth == 0  # the token never leaves the Hub's origin
    assert _staging_dirs(Path(tempfile.tempdir)) == []


def test_inputs_are_read_by_range_requests_without_over_fetch(hub, models):
    from perta_stream.sources.resolve import open_checkpoint

    checkpoints = [open_checkpoint(f"hf://org/{role}", role) for role in ("theta0", "full", "fgt")]
    header_bytes = sum(shard.data_start for checkpoint, _ in checkpoints for shard in checkpoint.shards)
    shard_bytes_served = sum(n for label, n in hub.file_bytes_by_path.items() if label.startswith("blobs/"))
    assert shard_bytes_served == header_bytes  # planning read the headers and nothing else
    hub.reset_counters()
    result = run_merge(_config("hf://org/fetch-count", hub_create_repo=True))
    served = sum(n for label, n in hub.file_bytes_by_path.items() if label.startswith("blobs/"))
    tensor_bytes = result.bytes_read
    assert served == header_bytes + tensor_bytes  # every tensor byte once, in chunks of 4 KiB


def test_local_disk_holds_at_most_the_bound(hub, models, monkeypatch):
    from perta_stream.sinks import hub_output

    staged_at_begin: list[int] = []
    samples: list[int] = []
    original_begin = hub_output.HubModelOutput.begin_shard

    def begin_shard(self, file_name, tensors):
        writer = original_begin(self, file_name, tensors)
        staged_at_begin.append(len(list(self._staging.glob("*.safetensors*"))))
        return writer

    monkeypatch.setattr(hub_output.HubModelOutput, "begin_shard", begin_shard)
    # Slow uploads make the writer outrun them, so the bound is what limits the disk.
    original_put = hub.hub.RequestHandlerClass._lfs_put
    puts: list[str] = []

    def slow_put(handler, oid):
        puts.append(oid)
        time.sleep(0.05)
        return original_put(handler, oid)

    monkeypatch.setattr(hub.hub.RequestHandlerClass, "_lfs_put", slow_put)
    stop = threading.Event()
    tmp_root = Path(tempfile.tempdir)

    def sample() -> None:
        while not stop.is_set():
            samples.append(sum(p.stat().st_size for d in _staging_dirs(tmp_root) for p in d.glob("*.safetensors*") if p.exists()))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # An alpha no other test uses, so every shard is new to the server and really uploaded.
        run_merge(_config("hf://org/bounded", alphas=(1.25,), hub_create_repo=True, hub_max_local_shards=1))
    finally:
        stop.set()
        sampler.join()
    full_shards = sorted(p for p in models[2].iterdir() if p.suffix == ".safetensors")
    largest_shard = max(p.stat().st_size for p in full_shards)
    assert len(staged_at_begin) == len(full_shards) == len(puts)
    assert max(staged_at_begin) == 1  # the shard being written, and no other
    assert max(samples) <= largest_shard
    assert max(samples) > 0


def test_persistent_read_failure_mid_run_commits_nothing(hub, monkeypatch):
    from perta_stream.pipelines import merge as merge_pipeline

    def plan_then_break_storage(*args, **kwargs):
        planned = plan_merge(*args, **kwargs)
        hub.inject(r"^GET /blobs/", status=500, times=None)  # every tensor read from now on fails
        return planned

    plan_merge = merge_pipeline.plan_merge
    monkeypatch.setattr(merge_pipeline, "plan_merge", plan_then_break_storage)
    commits_before = hub.commit_count
    with pytest.raises(HubError, match="reading hf://org/.*HTTP 500.*gave up after 4 tries"):
        run_merge(_config("hf://org/interrupted-read", hub_create_repo=True))
    assert hub.commit_count == commits_before
    assert not any(name.endswith(".safetensors") for name in hub.files("org/interrupted-read"))
    assert _staging_dirs(Path(tempfile.tempdir)) == []


def test_persistent_upload_failure_commits_nothing(hub):
    commits_before = hub.commit_count
    hub.inject(r"^PUT /_lfs/upload/", status=507, times=None)
    # An alpha no other test uses: shards the server's storage does not hold yet, so they are uploaded.
    with pytest.raises(HubError, match="uploading model-0000"):
        run_merge(_config("hf://org/interrupted-upload", alphas=(0.75,), hub_create_repo=True))
    assert hub.commit_count == commits_before
    assert "org/interrupted-upload" in hub.repos  # created, but it holds no model
    assert not any(name.endswith(".safetensors") for name in hub.files("org/interrupted-upload"))
    assert _staging_dirs(Path(tempfile.tempdir)) == []


def test_persistent_commit_failure_is_a_clear_error(hub):
    commits_before = hub.commit_count
    hub.inject(r"^POST /api/models/org/commit-fails/commit/", status=500, times=None)
    with pytest.raises(HubError, match="committing to hf://org/commit-fails.*HTTP 500.*gave up after 4 tries"):
        run_merge(_config("hf://org/commit-fails", hub_create_repo=True))
    assert hub.commit_count == commits_before
    assert _staging_dirs(Path(tempfile.tempdir)) == []


def test_transient_failures_are_retried(hub, local_merge):
    hub.inject(r"^GET /api/models/org/full", status=503, times=1)
    hub.inject(r"^GET /blobs/", status=502, times=2)
    hub.inject(r"^GET /blobs/", status=None, times=1, truncate_after=100)  # a connection cut mid-body
    hub.inject(r"^POST /api/models/org/retried/commit/", status=503, times=1)
    run_merge(_config("hf://org/retried", alphas=(1.5,), hub_create_repo=True))
    pushed = hub.files("org/retried")
    shards = [p for p in local_merge.iterdir() if p.suffix == ".safetensors"]
    assert shards and all(pushed[p.name] == p.read_bytes() for p in shards)
    assert all(fault.hits == (fault.times or fault.hits) for fault in hub.faults)


def test_expired_storage_locations_are_resolved_again(hub):
    from perta_stream.sources.resolve import open_checkpoint

    checkpoint, source = open_checkpoint("hf://org/full", "full")
    info = next(iter(checkpoint.tensors.values()))
    first = bytearray(info.nbytes)
    source.read_into(info.file_name, info.begin, memoryview(first))
    hub.rotate_signatures()  # every CDN URL handed out so far now answers 403
    second = bytearray(info.nbytes)
    source.read_into(info.file_name, info.begin, memoryview(second))
    assert first == second
    resolves = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path and info.file_name in path]
    assert len(resolves) == 2


def test_pinned_revision_and_folder_are_read(hub, models, tmp_path):
    from perta_stream.sources.checkpoint import open_local_checkpoint
    from perta_stream.sources.resolve import open_checkpoint

    _, theta0, full, _ = models
    first = hub.publish_folder("org/versions", theta0)
    hub.publish_folder("org/versions", full)  # main moves on
    hub.publish_folder("org/versions", full, path_in_repo="sub")
    old, _ = open_checkpoint(f"hf://org/versions@{first}", "theta0")
    assert old.header_sha256 == open_local_checkpoint(theta0, "theta0").header_sha256
    assert old.location == f"hf://org/versions@{first}"
    nested, _ = open_checkpoint("hf://org/versions@main/sub", "full")
    assert nested.header_sha256 == open_local_checkpoint(full, "full").header_sha256
    assert ".gitattributes" not in nested.side_files


@pytest.mark.parametrize(
    "location,message",
    [
        ("hf://org/does-not-exist", "the repo does not exist on http://127.0.0.1"),
        ("hf://org/full@no-such-branch", "the revision does not exist"),
    ],
)
def test_missing_repo_and_revision_are_clear_errors(hub, location, message):
    with pytest.raises(PlanError, match=message):
        run_merge(_config(str(Path(tempfile.tempdir) / "out"), full=location))
    assert not (Path(tempfile.tempdir) / "out").exists()


def test_refused_token_is_a_clear_error_and_never_shown(hub, monkeypatch, caplog):
    bad_token = "hf_bad_token_must_never_appear"
    monkeypatch.setenv("HF_TOKEN", bad_token)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PlanError) as caught:
        run_merge(_config(str(Path(tempfile.tempdir) / "out")))
    assert "refused the token (HTTP 401)" in str(caught.value)
    assert bad_token not in str(caught.value)
    assert bad_token not in caplog.text


def test_private_repo_needs_a_token(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PlanError, match=r"opening full checkpoint hf://org/full: the repo does not exist .* private and the token cannot see it"):
        run_merge(_config(str(Path(tempfile.tempdir) / "out")))


def test_push_errors_come_before_any_tensor_byte(hub, monkeypatch):
    def no_tensor_bytes() -> int:
        return sum(n for label, n in hub.file_bytes_by_path.items() if label.startswith("blobs/"))

    with pytest.raises(HubError, match="does not exist.*--create-repo"):
        run_merge(_config("hf://org/never-created"))
    headers_only = no_tensor_bytes()
    hub.create_empty_repo("org/read-only-target")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    with pytest.raises(HubError, match="no permission"):
        run_merge(_config("hf://org/read-only-target"))
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    hub.create_empty_repo("org/public-target")
    with pytest.raises(HubError, match="public but --private"):
        run_merge(_config("hf://org/public-target", hub_private=True))
    with pytest.raises(HubError, match="already holds model weights"):
        run_merge(_config("hf://org/fgt"))
    assert no_tensor_bytes() == 4 * headers_only  # four plans, each reading only headers
    assert "org/never-created" not in hub.repos


def test_overwrite_replaces_weights_in_one_commit(hub, models, tmp_path):
    _, theta0, _, _ = models
    hub.publish_folder("org/replace-me", theta0)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "model-00099-of-00099.safetensors").write_bytes(b"stale shard of an older layout")
    (extra / "LICENSE").write_text("kept")
    hub.publish_folder("org/replace-me", extra)
    commits_before = hub.commit_count
    run_merge(_config("hf://org/replace-me", overwrite=True))
    assert hub.commit_count == commits_before + 1
    files = hub.files("org/replace-me")
    index = json.loads(files["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) == {n for n in files if n.endswith(".safetensors")}
    assert "model-00099-of-00099.safetensors" not in files
    assert files["LICENSE"] == b"kept"


def test_cli_pushes_to_a_new_private_branch(hub, tmp_path):
    from perta_stream.cli import main

    code = main([
        "merge", "--theta0", "hf://org/theta0", "--full", "hf://org/full", "--fgt", "hf://org/fgt",
        "--out", "hf://org/cli-out", "--create-repo", "--private", "--revision", "unlearned",
        "--commit-message", "PerTA unlearning", "--max-local-shards", "1", "-q",
    ])
    assert code == 0
    repo = hub.repos["org/cli-out"]
    assert repo.private and set(repo.branches) == {"main", "unlearned"}
    assert ("org/cli-out", "unlearned", "PerTA unlearning") in hub.commit_messages
    assert "model.safetensors.index.json" in hub.files("org/cli-out", "unlearned")
    assert "model.safetensors.index.json" not in hub.files("org/cli-out", "main")


def test_several_alphas_go_to_folders_of_one_repo(hub):
    run_merge(_config("hf://org/sweep", alphas=(0.5, 1.0), hub_create_repo=True))
    files = hub.files("org/sweep")
    for alpha in ("0.5", "1"):
        assert f"alpha_{alpha}/model.safetensors.index.json" in files
        assert f"alpha_{alpha}/config.json" in files


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(out="local-dir", hub_private=True), "--private only applies to an hf:// --out"),
        (dict(full="hf://just-a-name"), "--full hf://just-a-name is not a Hub location"),
        (dict(full="hf://datasets/org/data"), "names a dataset repo"),
        (dict(out="hf://org/x", hub_max_local_shards=0), "--max-local-shards 0 must be at least 1"),
    ],
)
def test_bad_hub_options_are_refused_before_anything_runs(options, message):
    base = dict(theta0="hf://org/theta0", full="hf://org/full", fgt="hf://org/fgt", out="hf://org/out")
    base.update(options)
    with pytest.raises(PlanError, match=message):
        MergeConfig(**base)


def test_pickle_only_repo_is_refused(hub, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled, only named")
    (folder / "config.json").write_text("{}")
    hub.publish_folder("org/pickled", folder)
    with pytest.raises(PlanError, match="only pickle weights"):
        run_merge(_config(str(Path(tempfile.tempdir) / "out"), fgt="hf://org/pickled"))



def test_large_chunks_are_fetched_as_concurrent_parts(hub, local_merge, monkeypatch):
    from perta_stream.sources import hub as hub_source

    monkeypatch.setattr(hub_source, "PART_BYTES", 1024)  # a 4 KiB chunk becomes four concurrent 1 KiB GETs
    run_merge(_config(str(Path(tempfile.tempdir) / "out"), alphas=(1.5,)))
    ranges = [r for method, path, r in hub.requests if method == "GET" and path.startswith("/blobs/") and r]
    sizes = {int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for r in ranges}
    assert max(sizes) == 1024
    for shard in (p for p in local_merge.iterdir() if p.suffix == ".safetensors"):
        assert (Path(tempfile.tempdir) / "out" / shard.name).read_bytes() == shard.read_bytes()


def test_single_file_checkpoint_is_read(hub, models, tmp_path):
    from merge_fixtures import load_checkpoint, write_checkpoint
    from perta_stream.sources.checkpoint import open_local_checkpoint
    from perta_stream.sources.resolve import open_checkpoint

    _, theta0, _, _ = models
    single = tmp_path / "single"
    write_checkpoint(single, load_checkpoint(theta0), shards=1)
    hub.publish_folder("org/single", single)
    checkpoint, source = open_checkpoint("hf://org/single", "theta0")
    assert checkpoint.index_name is None
    assert checkpoint.header_sha256 == open_local_checkpoint(single, "theta0").header_sha256
    info = checkpoint.tensors["model.norm.weight"]
    buffer = bytearray(info.nbytes)
    source.read_into(info.file_name, info.begin, memoryview(buffer))
    assert bytes(buffer) == (single / "model.safetensors").read_bytes()[info.begin : info.end]


def test_offline_mode_is_a_clear_error(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PlanError, match="HF_HUB_OFFLINE is set; unset it"):
        run_merge(_config(str(Path(tempfile.tempdir) / "out")))


def test_bytes_corrupted_in_transit_are_caught_by_the_published_sha256(hub, monkeypatch, tmp_path):
    """A merge reads every byte of every shard in order, so each shard's sha256 is checked against
    the one the Hub publishes: one flipped byte stops the run before anything is committed."""
    from perta_stream.sources.hub import HubByteSource

    verified: list[set[str]] = []
    original_close = HubByteSource.close

    def remember_verified(self):  # noqa: ANN001
        verified.append(set(self.verified_files))
        original_close(self)

    monkeypatch.setattr(HubByteSource, "close", remember_verified)
    result = run_merge(_config(str(tmp_path / "clean")))
    assert result.outputs and all(verified) and len(verified) == 3  # every shard of every input verified

    original_read = hub_http.RangeReader.read_into
    flipped = {"done": False}

    def flip_one_byte(self, file_name, offset, view):  # noqa: ANN001
        original_read(self, file_name, offset, view)
        if "fgt" in str(self.location) and offset >= 4096 and not flipped["done"]:  # a tensor byte, past the header
            view[len(view) // 2] ^= 0x01
            flipped["done"] = True

    monkeypatch.setattr(hub_http.RangeReader, "read_into", flip_one_byte)
    out = tmp_path / "corrupted"
    with pytest.raises(HubError, match="corrupted in transit"):
        run_merge(_config(str(out)))
    assert flipped["done"] and not out.exists()


def test_bare_hub_ids_are_read_like_hf_locations(hub, local_merge, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder called org/...
    out = tmp_path / "bare"
    run_merge(MergeConfig(theta0="org/theta0", full="org/full", fgt="org/fgt", out=str(out), chunk_bytes=SMALL_CHUNK_BYTES, alphas=(1.5,)))
    for shard in local_merge.glob("*.safetensors"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert json.loads((out / "perta_merge.json").read_text())["inputs"]["full"]["location"].startswith("hf://org/full@")


def test_a_bare_id_that_looks_like_a_mistyped_folder_is_refused_without_asking_the_hub(hub, tmp_path, monkeypatch, capsys):
    from perta_stream.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()  # a local folder org/: `org/theta0` is likelier a typo of a path in it
    (tmp_path / "org" / "theta1").mkdir()
    out = tmp_path / "out"
    assert main(["merge", "--theta0", "org/theta0", "--full", "hf://org/full", "--fgt", "hf://org/fgt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--theta0 org/theta0 does not exist, but org/ is a local folder" in err and "hf://org/theta0" in err
    assert hub.requests == [] and not out.exists()  # refused while parsing: not a byte sent to the Hub
    for build in (
        lambda: MergeConfig(theta0="org/theta0", full="a", fgt="b", out="o"),
        lambda: __import__("perta_stream.config.stats", fromlist=["StatsConfig"]).StatsConfig(model="org/theta0", forget="f", retain="r", out="o"),
    ):
        with pytest.raises(PlanError, match="org/ is a local folder"):
            build()
    # hf:// still forces the Hub.
    assert main(["merge", "--theta0", "hf://org/theta0", "--full", "hf://org/full", "--fgt", "hf://org/fgt", "--out", str(out), "-q"]) == 0


def test_every_hub_input_is_announced_before_work_and_named_in_the_summary(hub, tmp_path, monkeypatch, capsys):
    from perta_stream.cli import main

    monkeypatch.chdir(tmp_path)
    commits = {name: hub.repos[f"org/{name}"].branches["main"] for name in ("theta0", "full", "fgt")}
    out = tmp_path / "out"
    assert main(["merge", "--theta0", "org/theta0", "--full", "hf://org/full", "--fgt", str(out.parent / "nowhere" / "x"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"theta0: org/theta0 is not a local folder; reading Hub repo org/theta0@{commits['theta0']}"
    assert err[1] == f"full: org/full is not a local folder; reading Hub repo org/full@{commits['full']}"
    assert err[2].startswith("error: ")  # announced before the plan was refused
    assert main(["merge", "--theta0", "org/theta0", "--full", "hf://org/full", "--fgt", "org/fgt", "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == [f"{role}: org/{role} is not a local folder; reading Hub repo org/{role}@{sha}" for role, sha in commits.items()]
    summary = err[-1]
    assert summary.startswith(f"merged into {out}") and all(f"{role} hf://org/{role}@{sha}" in summary for role, sha in commits.items())
    assert main(["merge", "--theta0", "org/theta0", "--full", "org/full", "--fgt", "org/fgt", "--out", str(tmp_path / "quiet"), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_the_tokenizer_of_a_hub_folder_is_read_at_its_revision_and_folder(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from perta_stream.sources.encoded_data import load_tokenizer
    from stats_fixtures import build_tokenizer

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tokenizer"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    hub.publish_folder("org/with-tokenizer", folder, path_in_repo="sub")
    loaded = load_tokenizer("hf://org/with-tokenizer@main/sub")
    assert loaded.get_vocab() == tokenizer.get_vocab()


def test_model_folder_download_takes_only_weights_configs_and_tokenizer(hub, models, tmp_path, monkeypatch, caplog):
    """eval and finetune load whole Hub models through a local copy: never Python files or pickles."""
    import shutil

    from huggingface_hub import constants

    from perta_stream.sources.hub import download_model_folder

    _, theta0, _, _ = models
    folder = Path(shutil.copytree(theta0, tmp_path / "with_code"))
    (folder / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle you want")
    hub.publish_folder("org/with-code", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="perta_stream.notice"):
        local = download_model_folder("hf://org/with-code")
    commit = hub.repos["org/with-code"].branches["main"]
    assert f"model: org/with-code is not a local folder; reading Hub repo org/with-code@{commit}" in caplog.messages
    names = {p.name for p in local.iterdir()}
    assert "config.json" in names and any(name.endswith(".safetensors") for name in names)
    assert "modeling_evil.py" not in names and "pytorch_model.bin" not in names
    for name in names:
        assert (local / name).read_bytes() == (folder / name).read_bytes()


@pytest.fixture(scope="module")
def one_pass_workspace(tmp_path_factory):
    """A one-pass unlearn's inputs and its local outputs (grad and fisher), the reference for its pushes."""
    from one_pass_fixtures import data_args, make_workspace, model_args
    from perta_stream.cli import main

    root = tmp_path_factory.mktemp("one_pass_hub")
    ws = make_workspace(root / "ws", kinds=("llama",))
    args = ["unlearn", "--one-pass", *model_args(ws, "llama"), *data_args(ws), "--method", "grad,fisher", "--alpha", "1.5"]
    assert main([*args, "--out", str(root / "local"), "-q"]) == 0
    return args, root / "local"


def _not_left_behind(tmp_root: Path) -> list[Path]:
    return _staging_dirs(tmp_root) + sorted(tmp_root.glob("perta-one-pass-*"))


def test_one_pass_pushes_each_output_in_one_commit_equal_to_the_local_one(hub, one_pass_workspace):
    from perta_stream.cli import main

    args, local = one_pass_workspace
    commits_before = hub.commit_count
    assert main([*args, "--out", "hf://org/one-pass-{method}", "--create-repo", "-q"]) == 0
    assert hub.commit_count == commits_before + 2  # one commit per output
    for method in ("grad", "fisher"):
        pushed = hub.files(f"org/one-pass-{method}")
        expected = {p.name: p.read_bytes() for p in (local / method).iterdir()}
        assert set(pushed) == set(expected) | {".gitattributes"}
        for name, data in expected.items():
            if name not in ("README.md", "perta_merge.json"):
                assert pushed[name] == data, name  # shards, index and side files, byte for byte
        record = json.loads(pushed["perta_merge.json"])
        assert record["method"] == method and record["shards"] == json.loads(expected["perta_merge.json"])["shards"]
    assert _not_left_behind(Path(tempfile.tempdir)) == []


def test_failed_one_pass_push_commits_nothing_and_leaves_nothing(hub, one_pass_workspace):
    from perta_stream.cli import main

    args, _ = one_pass_workspace
    commits_before = hub.commit_count
    hub.inject(r"^PUT /_lfs/upload/", status=507, times=None)
    # An alpha no other run uses: shards the server's storage does not hold yet, so they are uploaded.
    failed = [arg if arg != "1.5" else "0.25" for arg in args]
    assert main([*failed, "--out", "hf://org/one-pass-failed-{method}", "--create-repo", "-q"]) != 0
    assert hub.commit_count == commits_before
    assert not any(name.endswith(".safetensors") for name in hub.files("org/one-pass-failed-grad"))
    assert _not_left_behind(Path(tempfile.tempdir)) == []


def test_a_killed_one_pass_push_leaves_folders_the_next_push_removes(hub, one_pass_workspace, tmp_path):
    """SIGKILL runs no cleanup: the staging and state folders stay in the temporary folder, marked
    as this tool's and unlocked once the process is gone; the next push removes them (and never a
    folder another running push holds)."""
    import signal
    import subprocess
    import sys

    from perta_stream.cli import main
    from perta_stream.sinks.output_dir import AtomicOutputDir
    from reliability_fixtures import cli_env, killer_script

    args, _ = one_pass_workspace
    tmp_root = Path(tempfile.tempdir)
    live = AtomicOutputDir(tmp_root / "perta-hub-out-held-by-a-running-push", overwrite=False)
    live.open()  # locked, as a push running in another process holds its staging folder
    killer = killer_script("from perta_stream.sinks import hub_output\ndie_after(hub_output.HubModelOutput, 'shard_finished')")
    env = {**cli_env(), "TMPDIR": str(tmp_root)}
    command = [sys.executable, "-c", killer, "shard-finished", "1", *args, "--out", "hf://org/one-pass-killed-{method}", "--create-repo", "-q"]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    left = _not_left_behind(tmp_root)
    assert any(p.name.startswith("perta-hub-out-") and p != live.partial for p in left) and any(p.name.startswith("perta-one-pass-") for p in left)
    assert main([*args, "--out", "hf://org/one-pass-killed-{method}", "--create-repo", "-q"]) == 0
    assert _not_left_behind(tmp_root) == [live.partial]  # the folder a running push holds stays
    live.release()
