"""`shoal models pull` against a fake Hub on 127.0.0.1: never the real huggingface.co."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from shoal.models.download import PullError, pull
from shoal.ops import models
from shoal.schema.report import DownloadState

from fake_hf import FakeHub

MODEL = "org/tiny"


def tiny_model() -> dict[str, bytes]:
    shard = bytes(range(256)) * 300  # 76.8 kB each
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    return {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b'{"version": "1.0"}',
        "model-00001-of-00002.safetensors": shard,
        "model-00002-of-00002.safetensors": shard[::-1],
        "model.safetensors.index.json": json.dumps(index).encode(),
        "README.md": b"# tiny\n",
    }


@pytest.fixture(autouse=True)
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's home in tmp, and a dead default endpoint so that nothing in a test
    can reach the real Hub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "SHOAL_OFFLINE", "SHOAL_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub({MODEL: tiny_model()}) as hub:
        yield hub


def files_of(path: Path) -> dict[str, bytes]:
    """The model's files: what the engine would read, not huggingface_hub's metadata."""
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in path.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(path).parts
    }


def partials_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.name.endswith((".incomplete", ".part"))]


def test_pull_lands_every_file_byte_for_byte_and_reports_done(hub: FakeHub, tmp_path: Path):
    seen: list[DownloadState] = []
    target = tmp_path / "store" / "org--tiny"

    assert pull(MODEL, target, endpoint=hub.url, on_progress=seen.append) == target

    assert files_of(target) == tiny_model()
    last = seen[-1]
    assert last.status == "done" and last.error is None and last.finished_at
    assert last.files_done == last.files_total == 6
    assert last.bytes_done == last.bytes_total == sum(len(b) for b in tiny_model().values())
    assert json.loads(last.model_dump_json())["model_id"] == MODEL


def test_second_pull_of_the_same_commit_downloads_nothing(hub: FakeHub, tmp_path: Path):
    pull(MODEL, tmp_path / "m", endpoint=hub.url)
    hub.requests.clear()

    pull(MODEL, tmp_path / "m", endpoint=hub.url)

    assert all("/resolve/" not in r.path for r in hub.requests)


def test_include_patterns_pull_only_the_matching_files(hub: FakeHub, tmp_path: Path):
    pull(MODEL, tmp_path / "m", include=["*.json"], endpoint=hub.url)

    assert sorted(files_of(tmp_path / "m")) == [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]


def test_interrupted_pull_resumes_with_a_range_request(tmp_path: Path):
    # huggingface_hub writes in 10 MiB chunks: a partial file holds whole chunks only.
    shard = "model.safetensors"
    files = {"config.json": b"{}", shard: bytes(range(256)) * (12 * 4096)}  # 12 MiB
    with FakeHub({MODEL: files}) as hub:
        hub.cut(MODEL, shard, after_bytes=11 << 20, then_down=True)
        seen: list[DownloadState] = []

        with pytest.raises(PullError, match="run the same command again to resume") as failed:
            pull(MODEL, tmp_path / "m", endpoint=hub.url, on_progress=seen.append)

        assert shard in str(failed.value)
        assert seen[-1].status == "failed" and seen[-1].error == str(failed.value)
        (partial,) = partials_under(tmp_path / "m")
        kept = partial.stat().st_size
        assert kept == 10 << 20

        hub.down = False
        hub.requests.clear()
        seen.clear()
        pull(MODEL, tmp_path / "m", endpoint=hub.url, on_progress=seen.append)

        ranged = [r for r in hub.requests if r.method == "GET" and r.path.endswith(shard)]
        assert [r.range_start for r in ranged] == [kept]
        assert files_of(tmp_path / "m") == files
        assert partials_under(tmp_path / "m") == []
        assert seen[-1].bytes_done == seen[-1].bytes_total == len(files[shard]) + 2


def test_offline_uses_the_store_without_a_request(hub: FakeHub, tmp_path: Path):
    pull(MODEL, tmp_path / "m", endpoint=hub.url)
    hub.requests.clear()

    assert pull(MODEL, tmp_path / "m", offline=True, endpoint=hub.url) == tmp_path / "m"
    assert hub.requests == []


def test_offline_without_the_model_names_the_path(hub: FakeHub, tmp_path: Path):
    with pytest.raises(PullError, match="--offline") as failed:
        pull(MODEL, tmp_path / "absent", offline=True, endpoint=hub.url)

    assert str(tmp_path / "absent") in str(failed.value)
    assert hub.requests == []


def test_offline_refuses_a_partly_downloaded_model(hub: FakeHub, tmp_path: Path):
    hub.cut(MODEL, "model-00002-of-00002.safetensors", after_bytes=10, then_down=True)
    with pytest.raises(PullError):
        pull(MODEL, tmp_path / "m", endpoint=hub.url)
    (tmp_path / "m" / "left-by-hand.part").touch()  # the cut chunk was lost: mark one

    with pytest.raises(PullError, match="only partly downloaded"):
        pull(MODEL, tmp_path / "m", offline=True)


def test_unknown_repo_names_the_model(hub: FakeHub, tmp_path: Path):
    with pytest.raises(PullError, match="no such model .*org/missing.*HF_TOKEN"):
        pull("org/missing", tmp_path / "m", endpoint=hub.url)


def test_unknown_revision_names_it(hub: FakeHub, tmp_path: Path):
    with pytest.raises(PullError, match="no revision 'v9'"):
        pull(MODEL, tmp_path / "m", revision="v9", endpoint=hub.url)


def test_include_matching_nothing_says_what_the_repo_has(hub: FakeHub, tmp_path: Path):
    with pytest.raises(PullError, match=r"no file .* matches \*\.gguf .*config\.json"):
        pull(MODEL, tmp_path / "m", include=["*.gguf"], endpoint=hub.url)


def test_unreachable_endpoint_says_so(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        with pytest.raises(PullError, match="cannot reach"):
            pull(MODEL, tmp_path / "m", endpoint=dead)


def test_not_enough_disk_space_fails_before_downloading(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    full = SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000)
    monkeypatch.setattr("shoal.models.download.shutil.disk_usage", lambda _: full)

    with pytest.raises(PullError, match="not enough disk space"):
        pull(MODEL, tmp_path / "m", endpoint=hub.url)
    assert all("/resolve/" not in r.path for r in hub.requests)


def test_cli_pull_lands_the_model_in_the_models_dir(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)

    assert models.main(["pull", MODEL, "--models-dir", str(tmp_path / "store")]) == 0

    assert files_of(tmp_path / "store" / "org--tiny") == tiny_model()
    assert "6 files" in capsys.readouterr().out


def test_cli_offline_from_env_and_failure_exit_code(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("SHOAL_OFFLINE", "yes")

    assert models.main(["pull", MODEL, "--models-dir", str(tmp_path)]) == 1

    assert capsys.readouterr().err.startswith("shoal: org/tiny is not in the store")
    assert hub.requests == []


def test_cli_bad_model_id_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert models.main(["pull", "../etc", "--models-dir", str(tmp_path)]) == 2
    assert "not a model id" in capsys.readouterr().err
