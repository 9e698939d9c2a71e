"""`perta-stream doctor`: one line per check, the token never shown, a failing check fails the command."""

from __future__ import annotations

import importlib.metadata
import socket

import pytest

from perta_stream.cli import main

SECRET = "hf_doctor_secret_0123456789"


@pytest.fixture
def hub_at(monkeypatch, tmp_path):
    """Point huggingface_hub at an endpoint, online, with no token file."""
    from huggingface_hub import constants

    def point(endpoint: str) -> None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))

    return point


def test_every_check_is_one_line_and_the_token_is_never_printed(hub_at, monkeypatch, tmp_path, capsys):
    from hub_server import HubServer
    from merge_fixtures import make_triplet

    server = HubServer()
    try:
        hub_at(server.endpoint)
        monkeypatch.setenv("HF_TOKEN", SECRET)
        theta0, _, _ = make_triplet(tmp_path / "m", tied=True)
        assert main(["doctor", "--model", str(theta0), "--out", str(tmp_path / "runs" / "clean"), "--alpha", "0.5,1"]) == 0
    finally:
        server.stop()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[1].split(":")[0].strip() for line in lines] == ["torch", "memory", "peft", "gguf", "triton", "hub", "hub token", "disk"]
    assert SECRET not in "\n".join(lines)
    by_name = {line.split("]")[1].split(":")[0].strip(): line for line in lines}
    assert "(CPU build)" in by_name["torch"] or "CUDA" in by_name["torch"]
    assert "importing torch and the merge holds" in by_name["memory"] and "a default merge adds at most 512.00 MiB" in by_name["memory"]
    assert by_name["hub"].startswith(f"[ok  ] hub: {server.endpoint} answered (HTTP 4")  # the made-up repo: 401 or 404
    assert by_name["hub token"] == "[ok  ] hub token: found (HF_TOKEN; not shown)"
    # The theta0 fixture: 2 outputs of its size, its grad and fisher statistics of two sets in float32.
    assert by_name["disk"].startswith("[ok  ]") and "2 output(s)" in by_name["disk"] and f"free at {tmp_path}" in by_name["disk"]


def test_a_missing_extra_an_unreachable_hub_and_no_token_are_said(hub_at, monkeypatch, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub_at(f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "[info] peft: not installed; needed for LoRA adapters as inputs (pip install peft)" in out
    assert f"[warn] hub: http://127.0.0.1:{port} not reachable" in out and "local folders still work" in out
    assert "[info] hub token: none:" in out


def test_too_little_disk_for_the_unlearn_fails(monkeypatch, tmp_path, capsys):
    import shutil
    from collections import namedtuple

    from merge_fixtures import make_triplet

    theta0, _, _ = make_triplet(tmp_path / "m", tied=True)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert main(["doctor", "--model", str(theta0)]) == 1
    disk = next(line for line in capsys.readouterr().out.splitlines() if "] disk:" in line)
    assert disk.startswith("[fail] disk: 1000 B free at")
