"""Composition root of one machine: build every part complete, start its runners, serve the API."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import platform
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil
import uvicorn

from shoal import __version__
from shoal.api.app import create_app
from shoal.api.auth import api_keys
from shoal.api.router import Router, ServedCard
from shoal.cluster.discovery import (
    DuplicateNode,
    local_addresses,
    parse_static_peers,
    resolve_interfaces,
)
from shoal.cluster.events import EventLog
from shoal.cluster.identity import load_identity
from shoal.cluster.peers import PeerClient, peer_auth
from shoal.cluster.service import ClusterService, ClusterSettings
from shoal.cluster.view import Timing
from shoal.config import BUNDLED, NO_MODEL, RunSettings, StartupError, read_cluster_secret
from shoal.control import Controller
from shoal.models.bundled import BUNDLED_MODEL_ID, bundled_model_path
from shoal.models.cards import CardError, cards_digest, load_cards
from shoal.models.library import Library
from shoal.models.local import mlx_installed
from shoal.models.store import ModelStore, parse_dirs
from shoal.placement.plan import solo_instance
from shoal.runner.accelerators import has, pick_device
from shoal.runner.spec import node_capabilities, pick_engine
from shoal.schema.report import (
    MLX_BACKENDS,
    AutoPlace,
    ClusterPlan,
    HeldModel,
    InstanceSpec,
    RunnerState,
)
from shoal.schema.thresholds import parse_bounds
from shoal.web.limits import server_limits
from shoal.worker import Worker, WorkerSettings

log = logging.getLogger(__name__)

# In-flight generations are ended with an error at shutdown; this bounds the wait for their
# clients to read that error before connections are dropped.
GRACEFUL_SHUTDOWN_S = 5
STARTUP_TIMEOUT_S = 900.0  # a model loads and warms up within this, or the start fails


@dataclass(frozen=True)
class ModelChoice:
    id: str
    path: Path


def choose_model(settings: RunSettings) -> ModelChoice | None:
    """What --model and --model-id ask for; None for `--model none`."""
    if settings.model == NO_MODEL:
        return None
    if settings.model in (BUNDLED, BUNDLED_MODEL_ID):
        try:
            path = bundled_model_path()
        except FileNotFoundError as exc:
            raise StartupError(str(exc)) from None
        return ModelChoice(settings.model_id or BUNDLED_MODEL_ID, path)
    path = Path(settings.model).expanduser()
    if not path.exists():
        raise StartupError(
            f"model not found: {path} does not exist; pass --model a GGUF file or a Hugging "
            f"Face model directory, or leave --model out to serve the bundled {BUNDLED_MODEL_ID}"
        )
    return ModelChoice(settings.model_id or _default_model_id(path), path)


def _pick_engine(setting: str) -> str:
    try:
        return pick_engine(setting, platform.system(), platform.machine(), mlx_installed())
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def _capabilities() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(engines, backends) this node can run, reported to its peers for placement."""
    return node_capabilities(
        platform.system(), platform.machine(), has("cuda"), has("mps"), mlx_installed()
    )


def _default_model_id(path: Path) -> str:
    try:
        if path.samefile(bundled_model_path()):
            return BUNDLED_MODEL_ID
    except FileNotFoundError:
        pass
    return path.stem if path.is_file() else path.resolve().name


class Node:
    """One machine's shoal: its served models, their readiness, and the API server."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.choice = choose_model(settings)  # a bad --model fails before the port is taken
        if settings.min_nodes > 1 and self.choice is None:
            raise StartupError(
                f"--min-nodes {settings.min_nodes} needs a model to place: pass --model (a "
                "GGUF file, a Hugging Face dir, or leave it out for the bundled model)"
            )
        self.device = pick_device(settings.device)
        self.engine = _pick_engine(settings.engine)
        self.engines, self.backends = _capabilities()
        self.library = self._library()
        self.held = self.library.models  # updated in place when a download completes
        self._server: _Server | None = None
        self.identity = load_identity(settings.paths.data, settings.node_name)
        cards = ("cards", cards_digest(self.library.cards))
        self.cluster_settings = cluster_settings(settings, (cards,))
        self.cluster: ClusterService | None = None
        self.controller: Controller | None = None
        self.events = EventLog(settings.paths.data, self.identity.boot_id)
        self.solo = self._solo_instances()
        self.worker = Worker(
            self.identity.node_id,
            self.held,
            WorkerSettings(
                serve_host=settings.host,
                device=self.device,
                quantize=settings.quantize,
                max_batch=settings.max_batch,
                max_seq_len=settings.max_seq_len,
                tokenizer_cache=settings.paths.tokenizer_cache,
                cache_dir=settings.paths.cache,
                max_body_bytes=settings.max_body_bytes,
                max_tokens_cap=settings.max_tokens_cap,
                secret=self.cluster_settings.secret,  # to runners in their env, never argv
                spare=bool(self.cluster_settings.static_peers) or settings.min_nodes > 1,
            ),
            solo=tuple(self.solo.values()),
        )
        self.router = Router(self.solo, self.worker.states, settings.host, lambda: self.controller)
        # One pool for every call to a peer or to this node's runners, peers ranked by this
        # node's own path records (in its report once the cluster is up).
        # signed with the cluster secret, else (a keyed cluster) carrying this node's key
        self.api_keys = api_keys(settings)  # read once (--api-key-file): the peers and the API
        auth = peer_auth(self.cluster_settings.secret, self.identity.node_id, self.api_keys)
        self.peers = PeerClient(
            lambda: self.cluster.report.links if self.cluster else (), auth=auth
        )
        self.app = create_app(self)

    def _solo_instances(self) -> dict[str, InstanceSpec]:
        """The model this node serves alone (--model without --min-nodes > 1)."""
        choice = self.choice
        if choice is None or self.settings.min_nodes > 1:  # placed across nodes, not here
            return {}
        held = self.held[choice.id].held
        engine = self.engine
        if self.settings.engine == "auto" and set(held.backends) <= MLX_BACKENDS:
            engine = "mlx" if mlx_installed() else engine  # only mlx-lm reads this model
        instance = solo_instance(self.identity.node_id, held, engine)
        return {choice.id: instance.model_copy(update={"created_at": time.time()})}

    @property
    def models(self) -> Mapping[str, ServedCard]:
        return self.router.models()

    def endpoint(self, model_id: str) -> tuple[str | None, str]:
        return self.router.endpoint(model_id)

    def _library(self) -> Library:
        s, choice = self.settings, self.choice
        try:
            cards = load_cards(s.paths.config)
        except CardError as exc:
            raise StartupError(f"model card: {exc}; fix the card or move it away") from None
        root = Path(s.models_dir).expanduser() if s.models_dir else s.paths.data / "models"
        library = Library(
            ModelStore(root, parse_dirs(s.models_readonly_dirs)),
            cards,
            configured=(choice.id, choice.path) if choice else None,
            device=self.device,
            quantize=s.quantize,
            offline=s.offline,
            backends=self.backends,
        )
        try:
            library.refresh()
        except Exception as exc:  # the same one line as a failed load, before the port is taken
            raise _cannot_load(choice.path if choice else "the bundled model", exc) from None
        return library

    @property
    def held_models(self) -> Mapping[str, HeldModel]:
        return {m: local.held for m, local in self.held.items()}

    @property
    def ready(self) -> bool:
        return self.router.readiness()[0]

    @property
    def not_ready_reason(self) -> str:
        ready, why = self.router.readiness()
        return "" if ready else why

    def bind(self) -> socket.socket:
        """Claim the API port before the slow model load, so a busy port fails at once."""
        host, port = self.settings.host, self.settings.api_port
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except socket.gaierror as exc:
            raise StartupError(
                f"cannot listen on --host {host}: {exc.strerror}; "
                "pass an address of this machine, or 0.0.0.0 for all"
            ) from None
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts reuse TIME_WAIT
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} is already in use: stop the other server, or pick "
                    "another port with --api-port (env SHOAL_API_PORT)"
                ) from None
            raise StartupError(
                f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --api-port"
            ) from None
        return sock

    def start_runners(self) -> None:
        """Start the solo runners now: they load while the API and the cluster come up."""
        if self.solo and self.device == "cuda" and not has("cuda"):
            raise StartupError("--device cuda: torch sees no CUDA GPU here; use --device cpu")
        self.worker.reconcile(ClusterPlan())

    def wait_until_served(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until every solo runner passed its warm-up; a runner that fails to load or
        warm up ends the start with one line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, why = self.router.readiness()
            if ready:
                return
            failed = [s for s in self.worker.states() if s.status in ("failed", "stopped")]
            if failed:
                raise _cannot_load(self.choice.path if self.choice else "the model", failed[0])
            time.sleep(0.05)
        raise StartupError(f"the model did not become ready in {timeout:.0f} s: {why}")

    async def serve(self, sock: socket.socket, on_ready: Callable[[], None] | None = None) -> None:
        """Serve on a bound socket until stopped; warm up once the API answers (health 503)."""
        config = uvicorn.Config(
            self.app,
            log_level=self.settings.log_level,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            **server_limits(self.settings.client_timeout),
        )
        self._server = _Server(config, on_exit=self._end_generations)
        self.events.start()  # a crash of the previous run is recorded here
        serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started and not serving.done():
            await asyncio.sleep(0.02)
        if self._server.started:
            host, port = sock.getsockname()[:2]
            self.cluster = ClusterService(
                self.identity, self.cluster_settings, host, port, self.peers, self.events
            )
            self.controller = Controller(
                self.cluster,
                self.worker,
                self._auto_place(),
                self.settings.max_seq_len,
                self.library,
                capabilities=(self.engines, self.backends),
                min_throughput_ratio=self.settings.min_throughput_ratio,
            )
            try:
                await self.cluster.start(self.controller)
            except DuplicateNode:
                self._server.should_exit = True
                await serving
                raise StartupError(
                    f"another node on this network announces this node's id "
                    f"{self.identity.node_id}: is shoal already running with this data dir "
                    f"({self.settings.paths.data}), or was its node.json copied from another "
                    "machine? Stop the other one, or delete node.json here for a new id"
                ) from None
        try:
            if self._server.started:
                try:
                    await asyncio.to_thread(self.wait_until_served)
                except StartupError:
                    self._server.should_exit = True
                    await serving
                    raise
                if on_ready:
                    on_ready()
            await serving
        finally:
            await asyncio.to_thread(self.worker.stop_all)  # runners end before we say goodbye
            if self.cluster is not None:
                await self.cluster.stop()  # goodbyes to peers, mDNS goodbye, sockets closed
            await self.peers.aclose()
            self.events.stop()  # a clean stop: the next start records no crash

    def _auto_place(self) -> tuple[AutoPlace, ...]:
        if self.choice is None or self.settings.min_nodes < 2:
            return ()
        s = self.settings
        return (
            AutoPlace(
                model_id=self.choice.id,
                min_nodes=s.min_nodes,
                sharding=s.sharding,
                backend="ring" if self.engine == "mlx" else "gloo",  # mlx: an MlxRingInstance
                allow_blocked=s.allow_blocked,
            ),
        )

    def stop(self) -> None:
        """Ask a serving node to shut down (from any thread)."""
        if self._server is not None:
            self._server.should_exit = True
        self._end_generations()

    def close(self) -> None:
        self.worker.stop_all()

    def _end_generations(self) -> None:
        # Stopping the runners ends their in-flight requests with a clear error, so shutdown
        # never waits on a long generation; the relayed streams end with that error.
        threading.Thread(target=self.close, name="shoal-shutdown", daemon=True).start()


def _cannot_load(what: Path | str, exc: Exception | RunnerState) -> StartupError:
    if isinstance(exc, RunnerState):  # the runner said why in its status
        return StartupError(
            f"cannot load {what}: {exc.reason or exc.status}; pass --model a Llama-family GGUF "
            "file or Hugging Face model directory (--log-level debug shows the runner's log)"
        )
    log.debug("loading %s failed", what, exc_info=exc)
    return StartupError(
        f"cannot load {what}: {type(exc).__name__}: {exc}; pass --model a Llama-family GGUF "
        "file or Hugging Face model directory (--log-level debug shows the traceback)"
    )


def cluster_settings(
    settings: RunSettings, flags: tuple[tuple[str, str], ...] = ()
) -> ClusterSettings:
    """The cluster part of `shoal run`'s settings, with the user's text parsed."""
    try:
        peers = tuple(parse_static_peers(settings.peers))
    except ValueError as exc:
        raise StartupError(f"{exc}; write host:port,host:port") from None
    where = settings.discovery_interfaces.strip()
    interfaces = None
    if where not in ("all", "none", ""):
        interfaces = tuple(w.strip() for w in where.split(","))
        try:  # a typo in an interface name fails here, before the slow model load
            resolve_interfaces(interfaces, local_addresses())
        except ValueError as exc:
            raise StartupError(
                f"--discovery-interfaces: {exc}; pass interface names or addresses of this "
                "machine, 'all' or 'none'"
            ) from None
    try:
        thresholds = parse_bounds(settings.rtt_bounds)
    except ValueError as exc:
        raise StartupError(f"--rtt-bounds: {exc}") from None
    return ClusterSettings(
        thresholds=thresholds,
        namespace=settings.namespace,
        static_peers=peers,
        discovery=where != "none",
        discovery_interfaces=interfaces,
        pinned_leader=settings.leader,
        offline=settings.offline,
        flags=flags,
        secret=read_cluster_secret(settings),
        timing=Timing(suspect_after=settings.suspect_after, gone_after=settings.gone_after),
    )


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._on_exit()


def run(settings: RunSettings) -> None:
    """`shoal run`: serve until Ctrl-C or SIGTERM."""
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: end the run as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    node = Node(settings)
    sock = node.bind()
    try:
        node.start_runners()
        port = sock.getsockname()[1]

        def announce() -> None:
            print(startup_banner(node, port, _seconds_since_start()), flush=True)

        try:
            asyncio.run(node.serve(sock, on_ready=announce))
        except KeyboardInterrupt:
            pass
    finally:
        node.close()
        sock.close()
    print("shoal stopped", flush=True)


def _seconds_since_start() -> float:
    return time.time() - psutil.Process().create_time()


def api_urls(host: str, port: int) -> list[str]:
    """Base URLs a client can use; a wildcard host lists loopback and this machine's LAN IPs."""
    if host in ("0.0.0.0", "::", ""):
        hosts = ["127.0.0.1", *_lan_ipv4()]
    else:
        hosts = [f"[{host}]" if ":" in host else host]
    return [f"http://{h}:{port}/v1" for h in hosts]


def _lan_ipv4() -> list[str]:
    found = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET:
                ip = ipaddress.ip_address(addr.address)
                if not (ip.is_loopback or ip.is_link_local):
                    found.append(addr.address)
    return sorted(set(found), key=ipaddress.ip_address)


def startup_banner(node: Node, port: int, seconds: float) -> str:
    urls = api_urls(node.settings.host, port)
    lines = [f"shoal {__version__} ready in {seconds:.1f} s (since process start)"]
    models = node.models
    for model in models.values():
        lines.append(
            f"  model  {model.id} (context {model.context_length} tokens, "
            f"{node.device if node.engine == 'torch' else 'mlx'}, batch {node.settings.max_batch})"
        )
    lines += [f"  API    {urls[0]}", *(f"         {url}" for url in urls[1:])]
    if not models:
        lines.append("  no model served (--model none): nothing to chat with yet")
        return "\n".join(lines)
    body = {
        "model": next(iter(models)),
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    lines.append(
        f"  try    curl {urls[0]}/chat/completions -H 'Content-Type: application/json' "
        f"-d {shlex.quote(json.dumps(body))}"
    )
    return "\n".join(lines)
