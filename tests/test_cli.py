"""`shoal run` settings (flag > env > default), model choice, and the CLI's failure modes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.cli import build_parser
from shoal.config import Paths, RunSettings, StartupError, settings_from
from shoal.models.bundled import BUNDLED_MODEL_ID, bundled_model_path
from shoal.node import choose_model

pytestmark = pytest.mark.timeout(60)

DEFAULTS = dict(
    host="0.0.0.0",
    api_port=52415,
    model="bundled",
    model_id=None,
    device="auto",
    max_batch=4,
    max_seq_len=None,
    log_level="info",
)


def settings(argv: list[str], env: dict[str, str]) -> RunSettings:
    return settings_from(build_parser().parse_args(["run", *argv]), env)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, {}),
        ([], {"SHOAL_API_PORT": "9000"}, {"api_port": 9000}),
        (["--api-port", "9100"], {"SHOAL_API_PORT": "9000"}, {"api_port": 9100}),
        (["--host", "127.0.0.1"], {}, {"host": "127.0.0.1"}),
        ([], {"SHOAL_HOST": ""}, {}),  # an empty variable counts as unset
        ([], {"SHOAL_MODEL": "none"}, {"model": "none"}),
        (["--model", "/m.gguf"], {"SHOAL_MODEL": "none"}, {"model": "/m.gguf"}),
        ([], {"SHOAL_MODEL_ID": "env-id"}, {"model_id": "env-id"}),
        (["--model-id", "flag-id"], {"SHOAL_MODEL_ID": "env-id"}, {"model_id": "flag-id"}),
        ([], {"SHOAL_DEVICE": "cpu"}, {"device": "cpu"}),
        (["--device", "cuda"], {"SHOAL_DEVICE": "cpu"}, {"device": "cuda"}),
        ([], {"SHOAL_MAX_BATCH": "8"}, {"max_batch": 8}),
        ([], {"SHOAL_MAX_SEQ_LEN": "1024"}, {"max_seq_len": 1024}),
        (["--max-seq-len", "512"], {"SHOAL_MAX_SEQ_LEN": "1024"}, {"max_seq_len": 512}),
        (["--log-level", "debug"], {"SHOAL_LOG_LEVEL": "error"}, {"log_level": "debug"}),
    ],
)
def test_flag_beats_env_beats_default(
    argv: list[str], env: dict[str, str], expected: dict[str, Any]
) -> None:
    got = settings(argv, env)
    assert {name: getattr(got, name) for name in DEFAULTS} == {**DEFAULTS, **expected}


@pytest.mark.parametrize(
    ("env", "mentions"),
    [
        ({"SHOAL_API_PORT": "high"}, "SHOAL_API_PORT"),
        ({"SHOAL_DEVICE": "tpu"}, "auto, cpu, cuda"),
        ({"SHOAL_API_PORT": "70000"}, "0-65535"),
        ({"SHOAL_MAX_BATCH": "0"}, "--max-batch"),
    ],
)
def test_bad_environment_value_says_what_to_fix(env: dict[str, str], mentions: str) -> None:
    with pytest.raises(StartupError, match=mentions):
        settings([], env)


@pytest.mark.parametrize(
    ("env", "data", "cache", "config"),
    [
        (
            {"SHOAL_HOME": "/srv/shoal", "XDG_CACHE_HOME": "/x"},
            "/srv/shoal/data",
            "/srv/shoal/cache",
            "/srv/shoal/config",
        ),
        (
            {"XDG_DATA_HOME": "/d", "XDG_CACHE_HOME": "/c", "XDG_CONFIG_HOME": "/f"},
            "/d/shoal",
            "/c/shoal",
            "/f/shoal",
        ),
        ({}, "~/.local/share/shoal", "~/.cache/shoal", "~/.config/shoal"),
    ],
)
def test_paths_follow_shoal_home_then_xdg(
    env: dict[str, str], data: str, cache: str, config: str
) -> None:
    paths = Paths.from_env(env)
    expected = Paths(*(Path(p).expanduser() for p in (data, cache, config)))
    assert paths == expected
    assert paths.tokenizer_cache == expected.cache / "tokenizers"


def test_model_id_defaults_to_the_hf_id_or_the_file_or_dir_name(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny-llama.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()

    def chosen(model: str, model_id: str | None = None) -> tuple[str, Path] | None:
        choice = choose_model(RunSettings(model=model, model_id=model_id))
        return None if choice is None else (choice.id, choice.path)

    bundled = bundled_model_path()
    assert chosen("bundled") == (BUNDLED_MODEL_ID, bundled)
    assert chosen(BUNDLED_MODEL_ID) == (BUNDLED_MODEL_ID, bundled)
    assert chosen(str(bundled)) == (BUNDLED_MODEL_ID, bundled)
    assert chosen("bundled", "smol") == ("smol", bundled)
    assert chosen(str(gguf)) == ("tiny-llama.Q8_0", gguf)
    assert chosen(str(model_dir)) == ("my-model", model_dir)
    assert chosen("none") is None


# ---- the real command, in a subprocess -------------------------------------------------------


def shoal(*args: str) -> subprocess.Popen[str]:
    """`shoal` with default settings, except its files in a fresh dir and no mDNS: tests
    never announce on this machine's real interfaces."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env |= {
        "SHOAL_HOME": tempfile.mkdtemp(prefix="shoal-cli-"),
        "SHOAL_DISCOVERY_INTERFACES": "none",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("missing.gguf", None, "does not exist"),
        ("broken.gguf", b"not a gguf file", "cannot load"),
    ],
)
def test_unusable_model_is_one_line_and_exit_2(
    tmp_path: Path, name: str, content: bytes | None, says: str
) -> None:
    model = tmp_path / name
    if content is not None:
        model.write_bytes(content)
    process = shoal("run", "--model", str(model), "--api-port", "0")
    _, err = process.communicate()
    assert process.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(model) in lines[0] and says in lines[0] and "--model" in lines[0]


def test_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = shoal("run", "--host", "127.0.0.1", "--api-port", str(port), "--model", "none")
        _, err = process.communicate()
    assert process.returncode == 2
    assert len(err.strip().splitlines()) == 1 and "already in use" in err and "--api-port" in err


def test_run_without_model_serves_then_stops_cleanly_on_sigterm() -> None:
    process = shoal(
        "run", "--host", "127.0.0.1", "--api-port", "0", "--model", "none", "--log-level", "warning"
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(3)]
        assert "ready in" in banner[0], banner
        base = banner[1].split()[-1]  # "  API    http://127.0.0.1:PORT/v1"
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
        assert httpx.get(base.removesuffix("/v1") + "/health").json() == {"status": "ok"}
        assert httpx.get(f"{base}/models").json()["data"] == []
        missing = httpx.post(
            f"{base}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        assert missing.status_code == 404 and "--model" in missing.json()["error"]["message"]
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "shoal stopped" in out and "Traceback" not in err
