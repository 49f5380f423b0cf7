"""Settings for `shoal run`: each `--some-flag` also reads env `SHOAL_SOME_FLAG`.

Precedence is command line, then environment, then the default. The flags are generated from
the fields of `RunSettings`, so a new setting is one field with its help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.engine.footprint import QUANTIZE_MODES
from shoal.schema.limits import (
    DEFAULT_CLIENT_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_MAX_TOKENS_CAP,
    RequestLimits,
)

ENV_PREFIX = "SHOAL_"
_BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
BUNDLED = "bundled"  # --model value: the model shipped with shoal
NO_MODEL = "none"  # --model value: serve nothing until an instance is placed here
_POSITIVE = (  # settings that must be above 0
    "max_body_bytes",
    "client_timeout",
    "max_tokens_cap",
    "max_messages",
    "max_prompt_chars",
)


class StartupError(Exception):
    """Something the user fixes by changing how shoal is run; the message says what to do."""


@dataclass(frozen=True)
class Paths:
    """Where shoal keeps its files (XDG base directories, or all under SHOAL_HOME)."""

    data: Path
    cache: Path
    config: Path

    @property
    def tokenizer_cache(self) -> Path:
        return self.cache / "tokenizers"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Paths:
        if home := env.get("SHOAL_HOME"):
            root = Path(home).expanduser()
            return cls(root / "data", root / "cache", root / "config")

        def xdg(var: str, fallback: str) -> Path:
            return Path(env.get(var) or Path.home() / fallback).expanduser() / "shoal"

        return cls(
            xdg("XDG_DATA_HOME", ".local/share"),
            xdg("XDG_CACHE_HOME", ".cache"),
            xdg("XDG_CONFIG_HOME", ".config"),
        )


def _flag(default: Any, help: str, choices: tuple[str, ...] = (), hidden: bool = False) -> Any:
    """A setting; hidden ones (secrets) stay out of the settings' repr, so out of any log."""
    meta = {"help": help, "choices": choices}
    return field(default=default, repr=not hidden, metadata=meta)


@dataclass(frozen=True)
class RunSettings:
    host: str = _flag("0.0.0.0", "address the API listens on")
    api_port: int = _flag(52415, "port of the OpenAI-compatible API; 0 picks a free one")
    model: str = _flag(
        BUNDLED,
        f"GGUF file or Hugging Face model directory to serve; '{BUNDLED}' = SmolLM2-135M-Instruct"
        f" shipped with shoal, '{NO_MODEL}' = serve nothing until an instance is placed here",
    )
    model_id: str | None = _flag(
        None, "id clients use for the model; default: its Hugging Face id, or the file or dir name"
    )
    device: str = _flag("auto", "where the model runs", ("auto", "cpu", "cuda"))
    quantize: str = _flag(
        "auto",
        "how the torch engine holds weights on the CPU: auto = a GGUF's 4-bit blocks stay 4-bit "
        "(its other quantized types 8-bit) and 16-bit safetensors stay 16-bit; int8 = also "
        "quantize dense weights to int8 at load; none = dequantize everything to float32",
        QUANTIZE_MODES,
    )
    engine: str = _flag(
        "auto",
        "which engine serves the model this node serves alone: auto = mlx on an Apple-silicon "
        "Mac with shoal[mlx] installed, torch elsewhere",
        ("auto", "torch", "mlx"),
    )
    max_batch: int = _flag(4, "sequences decoded together (KV cache slots)")
    max_seq_len: int | None = _flag(None, "context window in tokens (default: the model's)")
    min_nodes: int = _flag(
        1,
        "1: serve --model on this node alone; N > 1: place it across N nodes that hold it "
        "(pipeline over torch.distributed) once the leader sees them",
    )
    sharding: str = _flag(
        "pipeline", "how --min-nodes > 1 splits the model", ("pipeline", "tensor")
    )
    allow_blocked: bool = _flag(
        False, "place --model with --min-nodes even if its model card says status = blocked"
    )
    models_dir: str | None = _flag(
        None, "the model store: downloads land here (default: <data dir>/models)"
    )
    models_readonly_dirs: str = _flag(
        "", "more model stores to serve from, never written (os.pathsep-separated, e.g. an exo one)"
    )
    offline: bool = _flag(False, "never contact the Hugging Face Hub: pulls use the store only")
    log_level: str = _flag("info", "log verbosity", ("debug", "info", "warning", "error"))
    node_name: str | None = _flag(None, "friendly name of this node (default: the hostname)")
    namespace: str = _flag("default", "cluster name: nodes of another namespace never join")
    peers: str = _flag(
        "", "static peers host:port,... for networks without multicast (VPNs, other subnets)"
    )
    discovery_interfaces: str = _flag(
        "all",
        "where mDNS announces and listens: 'all', 'none' (static peers only), or a comma list "
        "of interface names or addresses",
    )
    leader: bool = _flag(False, "prefer this node as the cluster leader")
    rtt_bounds: str = _flag(
        "",
        "per link kind, the RTT (ms) past which a path is degraded and preflight refuses it, "
        "e.g. 'vpn=50,ethernet=5' (defaults: thunderbolt 5, ethernet/veth 10, loopback 20, "
        "wifi 50, vpn 200)",
    )
    cors_origins: str = _flag(
        "",
        "browser origins allowed to call the API from their pages (CORS), comma-separated, "
        "e.g. 'http://localhost:5173,https://tools.example'; '*' = any origin; empty = CORS off",
    )
    # repr=False: a key never lands in a log line or a traceback that prints the settings
    api_key: str = field(
        default="",
        repr=False,
        metadata={
            "help": "API keys clients must send (Authorization: Bearer, or x-api-key), "
            "comma-separated; empty = the API is open (prefer the env var or --api-key-file: "
            "a command line is visible to every user of the machine)",
            "choices": (),
        },
    )
    api_key_file: str | None = _flag(None, "file of more API keys, one a line (# comments)")
    cluster_secret: str | None = _flag(
        None,
        "shared secret every node-to-node message is signed with: nodes without it (or with "
        "another) are refused; prefer the env or --cluster-secret-file (ps shows flags)",
        hidden=True,
    )
    cluster_secret_file: str | None = _flag(
        None, "file holding the cluster secret (read once at start, whitespace stripped)"
    )
    max_body_bytes: int = _flag(
        DEFAULT_MAX_BODY_BYTES,
        "largest request body the API and the runners accept; a larger one gets 413",
    )
    client_timeout: float = _flag(
        DEFAULT_CLIENT_TIMEOUT_S,
        "seconds a client has to send a request's head, and then its body: a slower body "
        "gets 408, a slower head has its connection closed",
    )
    max_tokens_cap: int = _flag(
        DEFAULT_MAX_TOKENS_CAP,
        "most output tokens one request may ask for (max_tokens, max_output_tokens, "
        "num_predict), and gets when it names none; more is a 400",
    )
    max_messages: int = _flag(DEFAULT_MAX_MESSAGES, "most messages in one request; more is a 400")
    max_prompt_chars: int = _flag(
        DEFAULT_MAX_PROMPT_CHARS,
        "longest prompt in characters, every message's text together; longer is a 400",
    )
    min_throughput_ratio: float = _flag(
        0.5,
        "re-place an instance whose decode tok/s stays under this share of its own baseline "
        "(its best first rates after placement) for 30 s of serving; 0 = never",
    )
    suspect_after: float = _flag(1.0, "seconds without a report before a peer is suspect")
    gone_after: float = _flag(
        2.0,
        "seconds without a report before a peer is gone and its instances move (reports are "
        "polled twice a second; raise it on a network that drops out for seconds, e.g. wifi)",
    )
    paths: Paths = field(default_factory=Paths.from_env)

    def __post_init__(self) -> None:
        if not 0 <= self.api_port <= 65535:
            raise StartupError(f"--api-port {self.api_port} is not a port: use 0-65535")
        if self.max_batch < 1:
            raise StartupError(f"--max-batch {self.max_batch} is too small: use 1 or more")
        if not 0 < self.suspect_after < self.gone_after:
            raise StartupError(
                f"--suspect-after {self.suspect_after} and --gone-after {self.gone_after}: "
                "use 0 < suspect-after < gone-after"
            )
        if not 0 <= self.min_throughput_ratio < 1:
            raise StartupError(
                f"--min-throughput-ratio {self.min_throughput_ratio}: use 0 (off) up to under 1"
            )
        if self.min_nodes < 1:
            raise StartupError(f"--min-nodes {self.min_nodes} is too small: use 1 or more")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise StartupError(f"--max-seq-len {self.max_seq_len} is too small: use 2 or more")
        parse_origins(self.cors_origins)
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise StartupError(f"{_option(name)} {getattr(self, name)}: use more than 0")

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return parse_origins(self.cors_origins)

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(self.max_tokens_cap, self.max_messages, self.max_prompt_chars)


def read_cluster_secret(settings: RunSettings) -> bytes | None:
    """--cluster-secret, else the stripped contents of --cluster-secret-file, else None;
    StartupError (never naming the secret) when both are given, or the file is unreadable
    or empty."""
    given, path = settings.cluster_secret, settings.cluster_secret_file
    if given is not None and path:
        raise StartupError("--cluster-secret and --cluster-secret-file: give only one")
    if path:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise StartupError(
                f"--cluster-secret-file {path}: cannot read it ({why}); fix the path or the "
                "file's permissions"
            ) from None
        if not text:
            raise StartupError(f"--cluster-secret-file {path} is empty: put the secret in it")
        return text.encode()
    if given is None:
        return None
    if not given.strip():
        raise StartupError("--cluster-secret is empty: give a secret, or leave it out")
    return given.strip().encode()


def parse_origins(text: str) -> tuple[str, ...]:
    """'--cors-origins a,b' -> its origins; StartupError for one that is not '*' or
    scheme://host[:port] (a path or a trailing slash never matches a browser's Origin)."""
    origins = tuple(o.strip() for o in text.split(",") if o.strip())
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (
            not sep or scheme not in ("http", "https") or not rest or "/" in rest
        ):
            raise StartupError(
                f"--cors-origins {origin!r} is not an origin: use scheme://host[:port] "
                "(e.g. http://localhost:5173, no path or trailing slash) or '*'"
            )
    return origins


def _flag_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(RunSettings) if "help" in f.metadata]


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _converter(name: str) -> type:
    hint = typing.get_type_hints(RunSettings)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint  # `int | None` parses as int


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Register one flag per setting; None means "not given" so the env and default can apply."""
    for f in _flag_fields():
        default = "" if f.default is None else f"; default {f.default}"
        help = f"{f.metadata['help']} (env {_env_var(f.name)}{default})"
        if _converter(f.name) is bool:  # --leader / --no-leader
            parser.add_argument(
                _option(f.name), action=argparse.BooleanOptionalAction, default=None, help=help
            )
            continue
        parser.add_argument(
            _option(f.name),
            type=_converter(f.name),
            choices=f.metadata["choices"] or None,
            default=None,
            help=help,
        )


def settings_from(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> RunSettings:
    """Resolve every setting: command line, else environment, else default."""
    values: dict[str, Any] = {}
    for f in _flag_fields():
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
        elif (raw := env.get(_env_var(f.name))) not in (None, ""):
            values[f.name] = _parse_env(f, raw)
    return RunSettings(**values, paths=Paths.from_env(env))


def _parse_env(f: dataclasses.Field[Any], raw: str) -> Any:
    var, convert = _env_var(f.name), _converter(f.name)
    if convert is bool:
        if raw.lower() not in _BOOLEANS:
            raise StartupError(f"{var}={raw!r} is not a boolean: use 1/0, true/false, yes/no")
        return _BOOLEANS[raw.lower()]
    try:
        value = convert(raw)
    except ValueError:
        raise StartupError(
            f"{var}={raw!r} is not a valid {convert.__name__}: fix or unset it"
        ) from None
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        allowed = ", ".join(f.metadata["choices"])
        raise StartupError(f"{var}={raw!r} is not one of {allowed}: fix or unset it")
    return value
