"""Tokenization, chat templates and streaming text helpers.

The hot path uses only the `tokenizers` library. transformers is imported solely to convert a
GGUF's embedded vocabulary the first time we see a file; the result is cached as a plain
`tokenizer.json` so later starts skip both the import and the conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.processors import TemplateProcessing

__all__ = ["IncrementalDecoder", "StopMatcher", "Tokenizer", "default_cache_dir"]

# Bump when the cached layout or the conversion changes, so stale caches are ignored.
_CACHE_FORMAT = 1
_META_FILE = "shoal_tokenizer.json"

# Used when a model ships no template: ChatML is what most small chat models expect.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PathLike = str | os.PathLike[str]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shoal" / "tokenizers"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


class Tokenizer:
    """A fast tokenizer plus the chat template and special ids generation needs."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_id = bos_id
        # Keep order: the first eos is the one a template's `eos_token` refers to.
        self._eos_order = list(dict.fromkeys(eos_ids))
        self.eos_ids: frozenset[int] = frozenset(self._eos_order)
        self.add_bos = add_bos
        self._template: jinja2.Template | None = None

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: PathLike, cache_dir: PathLike | None = None) -> Tokenizer:
        """A GGUF file or a Hugging Face model directory."""
        p = Path(path)
        return cls.from_hf_dir(p) if p.is_dir() else cls.from_gguf(p, cache_dir)

    @classmethod
    def from_gguf(cls, path: PathLike, cache_dir: PathLike | None = None) -> Tokenizer:
        path = Path(path).resolve()
        entry = Path(cache_dir or default_cache_dir()) / _gguf_cache_key(path)
        if not (entry / _META_FILE).is_file():
            _build_gguf_cache(path, entry)
        meta = json.loads((entry / _META_FILE).read_text(encoding="utf-8"))
        return cls(
            tokenizers.Tokenizer.from_file(str(entry / "tokenizer.json")),
            chat_template=meta["chat_template"],
            bos_id=meta["bos_id"],
            eos_ids=meta["eos_ids"],
            add_bos=meta["add_bos"],
        )

    @classmethod
    def from_hf_dir(cls, path: PathLike) -> Tokenizer:
        d = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        cfg = _read_json(d / "tokenizer_config.json")

        def token_id(value: Any) -> int | None:
            # Special tokens appear as plain strings or as serialized AddedToken dicts.
            text = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(text) if isinstance(text, str) else None

        model_cfgs = [_read_json(d / "generation_config.json"), _read_json(d / "config.json")]
        eos_ids: list[int] = []
        if (tid := token_id(cfg.get("eos_token"))) is not None:
            eos_ids.append(tid)
        # generation_config lists every id that ends a turn (e.g. Llama 3's eot and eom).
        for mc in model_cfgs:
            eos = mc.get("eos_token_id")
            eos_ids.extend([eos] if isinstance(eos, int) else eos or [])

        bos_id = token_id(cfg.get("bos_token"))
        if bos_id is None:
            ids = (mc.get("bos_token_id") for mc in model_cfgs)
            bos_id = next((b for b in ids if isinstance(b, int)), None)
        # Whether encode() adds BOS is decided by tokenizer.json's post-processor; report it.
        probe = backend.encode("a", add_special_tokens=True).ids
        return cls(
            backend,
            chat_template=_hf_chat_template(d, cfg),
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=bos_id is not None and probe[:1] == [bos_id],
        )

    def save_hf_dir(self, path: PathLike) -> None:
        """tokenizer.json and tokenizer_config.json, as `from_hf_dir` (and transformers,
        mlx-lm) read them back: same ids, chat template and special tokens."""
        d = Path(path)
        self.backend.save(str(d / "tokenizer.json"))
        name = self.backend.id_to_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template,
            "bos_token": name(self.bos_id) if self.bos_id is not None else None,
            "eos_token": name(self._eos_order[0]) if self._eos_order else None,
            "add_bos_token": self.add_bos,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1), "utf-8")

    # ---- encoding ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self._eos_order[0]) if self._eos_order else None

    @property
    def eos_tokens(self) -> tuple[str, ...]:
        return tuple(t for i in self._eos_order if (t := self.backend.id_to_token(i)) is not None)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character)."""
        piece = self.backend.id_to_token(token_id) or ""
        byte_level = isinstance(self.backend.decoder, tokenizers.decoders.ByteLevel)
        if byte_level and all(c in _BYTE_OF for c in piece):  # GPT-2, Llama 3, Qwen, SmolLM
            return bytes(_BYTE_OF[c] for c in piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece's byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    # ---- chat ----------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render like transformers' apply_chat_template(tokenize=False)."""
        if self._template is None:
            self._template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        return self._template.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **template_kwargs,
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools, **template_kwargs)
        # The template already writes BOS and role markers; adding them again would double them.
        return self.encode(text, add_special_tokens=False)


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text.

    Decodes only a short window (the tokens since the last emitted boundary) so each step is
    cheap, and diffs it against the same window without the new tokens: that keeps
    context-dependent decoding (SentencePiece's leading space) right. Text is held while the
    window ends in U+FFFD, i.e. a UTF-8 character split across tokens is not complete yet.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        context: Sequence[int] = (),
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # A few prompt tokens give the first generated token its real left context.
        self._ids: list[int] = list(context[-4:])
        self._read = len(self._ids)  # window[:_read] is already emitted

    def feed(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        # Slide the window: the emitted tokens become the next step's prefix.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held (e.g. an incomplete character at the end of generation)."""
        prefix = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""


class StopMatcher:
    """Finds stop strings in streamed text without emitting any part of them."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in dict.fromkeys(stops) if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            # Earliest match wins; emitted text never contains the start of a stop (see below).
            i, self.matched = min(hits, key=lambda h: h[0])
            self._held, self.stopped = "", True
            return buf[:i], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_len(self, buf: str) -> int:
        # Longest suffix of buf that could still grow into a stop string.
        longest = max((len(s) for s in self.stops), default=1)
        for k in range(min(len(buf), longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


# ---- chat template ---------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    # transformers' `{% generation %}` marks assistant spans for training masks; we only need
    # such templates to parse, so the block renders its body unchanged.
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON, as transformers renders it.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_template(source: str) -> jinja2.Template:
    # Templates come from model files, i.e. untrusted: render them in the immutable sandbox
    # with the same options and helpers as transformers so output matches byte for byte.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _hf_chat_template(d: Path, cfg: dict[str, Any]) -> str | None:
    # Newer checkpoints keep the template in its own file, which takes precedence.
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    tpl = cfg.get("chat_template") or _read_json(d / "chat_template.json").get("chat_template")
    if isinstance(tpl, list):
        # Named templates ("default", "tool_use", ...): use "default", else the first.
        named = {t["name"]: t["template"] for t in tpl if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


# ---- GGUF conversion and cache -----------------------------------------------------------


def _gguf_cache_key(path: Path) -> str:
    # Path + size + mtime identify the file without reading its ~100 MB-100 GB of content.
    st = path.stat()
    ident = f"{_CACHE_FORMAT}|{path}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _convert_gguf_tokenizer(path: Path) -> tokenizers.Tokenizer:
    """Build a fast tokenizer from the GGUF's vocabulary (slow: imports transformers)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf.backend_tokenizer


def _build_gguf_cache(path: Path, entry: Path) -> None:
    import gguf

    from shoal.engine.weights import read_gguf_metadata

    meta = read_gguf_metadata(gguf.GGUFReader(path))
    backend = _convert_gguf_tokenizer(path)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    eos_ids = [meta[k] for k in (f"tokenizer.ggml.{n}" for n in eos_keys) if k in meta]
    # llama.cpp's defaults when the flags are absent: add BOS, not EOS.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and bool(eos_ids)
    _set_special_template(backend, bos_id if add_bos else None, eos_ids[0] if add_eos else None)

    entry.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename, so a concurrent or interrupted start never sees half.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    backend.save(str(tmp / "tokenizer.json"))
    info = {
        "format": _CACHE_FORMAT,
        "source": str(path),
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_id": bos_id,
        "eos_ids": eos_ids,
        "eos_tokens": [backend.id_to_token(i) for i in eos_ids],
        "add_bos": add_bos,
    }
    (tmp / _META_FILE).write_text(json.dumps(info, indent=1, ensure_ascii=False), "utf-8")
    if entry.exists() and not (entry / _META_FILE).is_file():
        shutil.rmtree(entry, ignore_errors=True)  # not ours (renames are atomic): replace it
    try:
        tmp.rename(entry)
    except OSError:
        # Another process won the race: its content is equivalent, keep it.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (entry / _META_FILE).is_file():
            raise


def _set_special_template(
    backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None
) -> None:
    # Make encode(add_special_tokens=True) follow the GGUF's add_bos/add_eos flags, as
    # llama.cpp does, whatever the converter chose.
    bos = [(backend.id_to_token(bos_id), bos_id)] if bos_id is not None else []
    eos = [(backend.id_to_token(eos_id), eos_id)] if eos_id is not None else []
    single = [t for t, _ in bos] + ["$A"] + [t for t, _ in eos]
    backend.post_processor = TemplateProcessing(
        single=single, special_tokens=list(dict.fromkeys(bos + eos))
    )
