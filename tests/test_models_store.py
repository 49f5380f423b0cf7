"""The model store, manifests, cards and `shoal audit`'s checks, on directories built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.models.cards import (
    CardError,
    ModelCard,
    blocked_reason,
    card_for,
    cards_digest,
    load_cards,
    read_card,
)
from shoal.models.local import local_models
from shoal.models.manifest import Manifest, build_manifest
from shoal.models.store import ModelStore, dir_name, load_path, model_id_of, validate_model_id
from shoal.ops.audit import READY, audit, ready, render
from shoal.placement.plan import files_agree
from shoal.schema.report import HeldModel

MODEL = "org/tiny"

# -- store -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "name"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB--SmolLM2-135M-Instruct"),
        ("mlx-community/Qwen3-0.6B-4bit", "mlx-community--Qwen3-0.6B-4bit"),
        ("local-model", "local-model"),
    ],
)
def test_dir_names_follow_exo_and_round_trip(model_id: str, name: str) -> None:
    assert dir_name(model_id) == name
    assert model_id_of(name) == model_id


@pytest.mark.parametrize("bad", ["", "a/b/c", "../x", "org/..", "org/", "a b/c", "a\\b"])
def test_ids_that_would_escape_the_store_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a model id"):
        validate_model_id(bad)


def hf_dir(root: Path, shards: int = 2, **overrides: bytes | None) -> Path:
    """A safetensors model dir as `hf download` leaves it (content is not loadable: the
    manifest only reads names and sizes)."""
    files: dict[str, bytes | None] = {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        ".cache/huggingface/download/config.json.metadata": b"etag-on-this-node\n",
    }
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for name in names:
        files[name] = b"w" * 64
    if shards > 1:
        index = {"weight_map": {f"layer{i}": n for i, n in enumerate(names)}}
        files["model.safetensors.index.json"] = json.dumps(index).encode()
    files.update(overrides)
    for rel, content in files.items():
        if content is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
    return root


def test_store_finds_models_in_its_dir_then_the_read_only_ones(tmp_path: Path) -> None:
    own, exo = tmp_path / "own", tmp_path / "exo"
    hf_dir(own / "org--a", shards=1)
    (exo / "org--b").mkdir(parents=True)
    (exo / "org--b" / "b.Q4_0.gguf").write_bytes(b"GGUF")
    (exo / "org--a").mkdir()  # the same id in a read-only dir: the writable store wins
    (exo / "org--a" / "a.gguf").write_bytes(b"GGUF")
    (exo / "not-a-model").mkdir()
    store = ModelStore(own, (exo,))
    found = {m.model_id: m for m in store.models()}
    assert set(found) == {"org/a", "org/b"}
    assert found["org/a"].path == own / "org--a" and found["org/a"].writable
    assert found["org/b"].path == exo / "org--b" and not found["org/b"].writable
    assert store.find("org/b").path == exo / "org--b"  # type: ignore[union-attr]
    assert store.find("org/c") is None
    assert store.dir_for("org/c") == own / "org--c"
    assert load_path(exo / "org--b") == exo / "org--b" / "b.Q4_0.gguf"
    assert load_path(own / "org--a") == own / "org--a"


def test_store_location_comes_from_the_environment(tmp_path: Path) -> None:
    env = {"SHOAL_MODELS_DIR": str(tmp_path / "m"), "SHOAL_MODELS_READONLY_DIRS": "/x:/y"}
    store = ModelStore.from_env(tmp_path / "data", env)
    assert store.root == tmp_path / "m" and store.readonly == (Path("/x"), Path("/y"))
    assert ModelStore.from_env(tmp_path / "data", {}).root == tmp_path / "data" / "models"


# -- manifests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "shards", "fmt", "missing", "partials"),
    [
        ({}, 2, "safetensors", [], []),
        ({}, 1, "safetensors", [], []),
        ({"model-00002-of-00002.safetensors": None}, 2, "safetensors",
         ["model-00002-of-00002.safetensors"], []),
        ({"model.safetensors.index.json": None}, 2, "safetensors",
         ["model.safetensors.index.json"], []),
        ({"config.json": None, "tokenizer.json": None}, 1, "safetensors",
         ["config.json", "tokenizer.json or tokenizer.model"], []),
        ({"model-00001-of-00002.safetensors.part": b"w"}, 2, "safetensors", [],
         ["model-00001-of-00002.safetensors.part"]),
        ({".cache/huggingface/download/x.incomplete": b"w"}, 2, "safetensors", [],
         [".cache/huggingface/download/x.incomplete"]),
        ({"extra.gguf": b"GGUF"}, 1, "mixed", [], []),
    ],
)  # fmt: skip
def test_manifest_states_format_missing_files_and_partials(
    tmp_path: Path,
    overrides: dict[str, bytes | None],
    shards: int,
    fmt: str,
    missing: list[str],
    partials: list[str],
) -> None:
    m = build_manifest(MODEL, hf_dir(tmp_path, shards, **overrides))
    assert (m.format, list(m.missing), list(m.partials)) == (fmt, missing, partials)
    assert not any(f.path.startswith(".cache/") for f in m.files)
    assert m.safetensors_count == len([f for f in m.files if f.path.endswith(".safetensors")])


def test_manifest_of_a_single_gguf_file_lists_that_file_only(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF" * 10)
    (tmp_path / "unrelated.txt").write_text("x")
    m = build_manifest(MODEL, tmp_path / "model.gguf", hash=True)
    assert [(f.path, f.size) for f in m.files] == [("model.gguf", 40)]
    assert m.format == "gguf" and m.missing == () and m.files[0].sha256 is not None


def test_the_digest_ignores_cache_metadata_but_not_sizes(tmp_path: Path) -> None:
    a = build_manifest(MODEL, hf_dir(tmp_path / "a"))
    b = build_manifest(
        MODEL,
        hf_dir(tmp_path / "b", **{".cache/huggingface/download/config.json.metadata": b"other"}),
    )
    c = build_manifest(MODEL, hf_dir(tmp_path / "c", **{"tokenizer.json": b"{ }"}))
    assert a.digest == b.digest != c.digest


# -- audit -------------------------------------------------------------------------------------


def manifests(tmp_path: Path, **per_node: dict[str, bytes | None]) -> dict[str, Manifest | str]:
    return {
        node: build_manifest(MODEL, hf_dir(tmp_path / node, **changes), hash=True)
        for node, changes in per_node.items()
    }


def failed(checks: list) -> dict[str, str]:
    return {c.name.split(" (")[0]: c.detail for c in checks if not c.ok}


def test_audit_passes_complete_identical_dirs(tmp_path: Path) -> None:
    got = manifests(tmp_path, a={}, b={})
    checks = audit(got, expect_shards=2, hash=True)
    assert ready(checks), checks
    assert render(MODEL, got, checks).endswith(READY)


def test_audit_passes_when_only_hf_cache_metadata_differs(tmp_path: Path) -> None:
    meta = ".cache/huggingface/download/model-00001-of-00002.safetensors.metadata"
    got = manifests(tmp_path, a={}, b={meta: b"etag b\n"})
    assert ready(audit(got, hash=True))


@pytest.mark.parametrize(
    ("b_changes", "expect_shards", "check", "detail"),
    [
        ({"model-00002-of-00002.safetensors.incomplete": b"w"}, None, "no partial downloads",
         "b: model-00002-of-00002.safetensors.incomplete"),
        ({"model-00002-of-00002.safetensors": None}, None, "required files",
         "b: missing model-00002-of-00002.safetensors"),
        ({"model-00002-of-00002.safetensors": None}, 2, "shard count",
         "b: 1 safetensors files, expected 2"),
        ({"model-00001-of-00002.safetensors": b"w" * 63}, None, "parity",
         "b: model-00001-of-00002.safetensors is 63 bytes, others 64"),
        ({"model-00001-of-00002.safetensors": b"x" * 64}, None, "parity",
         "b: model-00001-of-00002.safetensors content differs (sha256)"),
    ],
)  # fmt: skip
def test_audit_names_the_node_and_file_that_fail(
    tmp_path: Path, b_changes: dict, expect_shards: int | None, check: str, detail: str
) -> None:
    got = manifests(tmp_path, a={}, b=b_changes, c={})
    checks = audit(got, expect_shards=expect_shards, hash=True)
    assert not ready(checks)
    assert detail in failed(checks)[check]
    assert "NOT READY" in render(MODEL, got, checks)


def test_audit_fails_gguf_on_one_node_and_safetensors_on_another(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "tiny.Q4_0.gguf").write_bytes(b"GGUF")
    got: dict[str, Manifest | str] = {
        "a": build_manifest(MODEL, hf_dir(tmp_path / "a")),
        "g": build_manifest(MODEL, tmp_path / "g"),
    }
    problems = failed(audit(got))
    assert problems["one format everywhere"] == "a: safetensors, g: gguf"
    assert "parity" in problems


def test_audit_fails_a_node_that_gave_no_manifest(tmp_path: Path) -> None:
    got = manifests(tmp_path, a={})
    got["b"] = "unreachable at 10.0.0.2:52415"
    problems = failed(audit(got))
    assert problems["manifests from every node"] == "b: unreachable at 10.0.0.2:52415"
    assert not ready(audit({}))


def test_hash_parity_needs_hashes_from_every_node(tmp_path: Path) -> None:
    got: dict[str, Manifest | str] = {
        "a": build_manifest(MODEL, hf_dir(tmp_path / "a"), hash=True),
        "b": build_manifest(MODEL, hf_dir(tmp_path / "b")),
    }
    assert failed(audit(got, hash=True))["parity"] == "no hashes from b"


# -- placement keeps to nodes whose files agree ----------------------------------------------


def held(digest: str | None) -> HeldModel:
    return HeldModel(
        model_id=MODEL, num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4,
        weight_bytes=1, files_digest=digest,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("digests", "allowed", "refused"),
    [
        ({"a": "x", "b": "x"}, {"a", "b"}, []),
        ({"a": "x", "b": "x", "c": "y"}, {"a", "b"}, ["c"]),
        ({"a": "x", "b": None, "c": "y", "d": "y"}, {"b", "c", "d"}, ["a"]),
        ({"a": "y", "b": "x"}, {"b"}, ["a"]),  # a tie: the same choice on every node
        ({"a": None, "b": None}, {"a", "b"}, []),
    ],
)
def test_files_agree(digests: dict, allowed: set, refused: list) -> None:
    got_allowed, reasons = files_agree({n: held(d) for n, d in digests.items()})
    assert got_allowed == allowed
    assert [r.nodes[0] for r in reasons] == refused
    assert all("shoal audit org/tiny" in r.text for r in reasons)


# -- cards -------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_legacy_card_without_backends_gets_every_backend_the_node_supports(
    tmp_path: Path,
) -> None:
    card = read_card(write(tmp_path / "old.toml", 'model_id = "org/old"\n'))
    assert card.backends is None and card.status == "active" and card.name == "old"
    assert card.backends_on(("gloo", "nccl")) == ("gloo", "nccl")
    assert card.backends_on(("gloo",)) == ("gloo",)
    narrow = read_card(write(tmp_path / "n.toml", 'model_id = "x"\nbackends = ["nccl"]\n'))
    assert narrow.backends_on(("gloo",)) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('model_id = "x"\nstatus = "paused"\n', "field 'status'"),
        ('model_id = "x"\nbackends = ["mpi"]\n', "field 'backends.0'"),
        ('model_id = "x"\nstauts = "blocked"\n', "field 'stauts': Extra inputs"),
        ('model_id = "x"\nexpected_shards = 0\n', "field 'expected_shards'"),
        ('name = "no id"\n', "field 'model_id': Field required"),
        ("model_id = \n", "not valid TOML"),
    ],
)
def test_a_bad_card_error_names_the_file_and_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(CardError) as info:
        read_card(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_user_cards_override_built_in_ones(tmp_path: Path) -> None:
    builtin = load_cards(None)
    smol = builtin["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert smol.format == "gguf" and smol.expected_shards == 1
    write(
        tmp_path / "cards" / "smol.toml",
        'model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"\nstatus = "watch"\n',
    )
    assert load_cards(tmp_path)["HuggingFaceTB/SmolLM2-135M-Instruct"].status == "watch"
    assert card_for({}, "org/none").status == "active"


@pytest.mark.parametrize(
    ("status", "allow", "refused"),
    [
        ("active", False, False),
        ("watch", False, False),
        ("deprecated", False, False),
        ("blocked", False, True),
        ("blocked", True, False),
    ],
)
def test_only_blocked_models_need_the_override(status: str, allow: bool, refused: bool) -> None:
    card = ModelCard(model_id=MODEL, status=status, status_note="drifts")  # type: ignore[arg-type]
    reason = blocked_reason(card, allow)
    assert (reason is not None) == refused
    if reason:
        assert "allow_blocked=true" in reason and "(drifts)" in reason


# -- what a node holds -------------------------------------------------------------------------


def test_partial_store_dirs_are_not_held(tmp_path: Path) -> None:
    from shoal.models.bundled import BUNDLED_MODEL_ID, bundled_model_path

    store = ModelStore(tmp_path)
    (tmp_path / "org--ok").mkdir()
    (tmp_path / "org--ok" / "m.gguf").write_bytes(bundled_model_path().read_bytes())
    (tmp_path / "org--part").mkdir()
    (tmp_path / "org--part" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "org--part" / "m.gguf.part").write_bytes(b"")
    (tmp_path / "org--broken").mkdir()
    (tmp_path / "org--broken" / "m.gguf").write_bytes(b"not a gguf")
    found = local_models(None, store=store)
    assert set(found) == {"org/ok", BUNDLED_MODEL_ID}
    assert found["org/ok"].source == tmp_path / "org--ok"
    # the same bytes under another name are other files: parity is by path and size
    assert found["org/ok"].held.files_digest != found[BUNDLED_MODEL_ID].held.files_digest


def test_cards_that_differ_give_different_drift_digests(tmp_path: Path) -> None:
    builtin = load_cards(None)
    write(tmp_path / "cards" / "x.toml", 'model_id = "org/x"\nstatus = "blocked"\n')
    mine = load_cards(tmp_path)
    assert cards_digest(builtin) == cards_digest(load_cards(None)) != cards_digest(mine)
