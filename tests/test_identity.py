"""Node identity: a node id that survives restarts, a fresh boot id per start, clear errors."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from shoal.cluster.identity import NODE_FILE, IdentityError, load_identity
from shoal.config import StartupError


def test_first_start_creates_node_file_with_a_short_url_safe_id(tmp_path: Path) -> None:
    ident = load_identity(tmp_path / "data", "alpha", now=1000.0)
    assert re.fullmatch(r"[0-9a-f]{16}", ident.node_id)
    assert (ident.name, ident.boot_started, ident.joined_at) == ("alpha", 1000.0, 1000.0)
    stored = json.loads((tmp_path / "data" / NODE_FILE).read_text())
    assert stored["node_id"] == ident.node_id and stored["joined_at"] == 1000.0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [NODE_FILE]  # no temp left


def test_restart_keeps_node_id_and_join_time_but_gets_a_new_boot(tmp_path: Path) -> None:
    first = load_identity(tmp_path, "alpha", now=1000.0)
    second = load_identity(tmp_path, "alpha", now=2000.0)
    assert (second.node_id, second.joined_at) == (first.node_id, 1000.0)
    assert second.boot_id != first.boot_id and len(second.boot_id) == 32
    assert second.boot_started == 2000.0


def test_two_data_dirs_are_two_nodes(tmp_path: Path) -> None:
    assert load_identity(tmp_path / "a").node_id != load_identity(tmp_path / "b").node_id


def test_identity_is_frozen(tmp_path: Path) -> None:
    ident = load_identity(tmp_path, "alpha")
    with pytest.raises(AttributeError):
        ident.name = "beta"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("given", "hostname", "expected"),
    [
        pytest.param(None, "mac-studio.local", "mac-studio", id="hostname_without_domain"),
        pytest.param(None, "gpu-box", "gpu-box", id="plain_hostname"),
        pytest.param("  ", "gpu-box.lan", "gpu-box", id="blank_name_falls_back_to_hostname"),
        pytest.param("kitchen", "gpu-box", "kitchen", id="given_name_wins"),
        pytest.param(None, "", "shoal-node", id="no_hostname_at_all"),
    ],
)
def test_friendly_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str | None, hostname: str, expected: str
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert load_identity(tmp_path, given).name == expected


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        pytest.param("{not json", "cannot read", id="not_json"),
        pytest.param("[1, 2]", "not a JSON object", id="not_an_object"),
        pytest.param('{"joined_at": 5}', "no valid node_id", id="missing_node_id"),
        pytest.param('{"node_id": "a/b c", "joined_at": 5}', "no valid node_id", id="unsafe_id"),
        pytest.param('{"node_id": "0123456789ab"}', "no valid joined_at", id="missing_joined_at"),
        pytest.param(
            '{"node_id": "0123456789ab", "joined_at": true}', "no valid joined_at", id="bool_join"
        ),
        pytest.param(
            '{"node_id": "0123456789ab", "joined_at": "x"}', "no valid joined_at", id="text_join"
        ),
        pytest.param(b"\xff\xfe", "cannot read", id="not_utf8"),
    ],
)
def test_corrupt_node_file_names_the_file_and_the_fix(
    tmp_path: Path, content: str | bytes, complaint: str
) -> None:
    path = tmp_path / NODE_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(IdentityError) as caught:
        load_identity(tmp_path)
    message = str(caught.value)
    assert complaint in message and str(path) in message and "delete" in message
    assert path.read_bytes() == (content if isinstance(content, bytes) else content.encode())


def test_a_valid_hand_written_node_file_is_used(tmp_path: Path) -> None:
    (tmp_path / NODE_FILE).write_text('{"node_id": "kitchen-mac_01", "joined_at": 42}')
    ident = load_identity(tmp_path, "kitchen")
    assert (ident.node_id, ident.joined_at) == ("kitchen-mac_01", 42.0)


def test_unwritable_data_dir_is_a_startup_error_with_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StartupError, match="cannot create node identity.*SHOAL_HOME"):
        load_identity(blocker / "data")
