"""`shoal models`: the models in this machine's store. `pull` downloads one from the Hub.

`shoal models pull ORG/NAME` lands the files in `<store>/ORG--NAME`, resumes an interrupted
pull, and with `--offline` (or env SHOAL_OFFLINE) only checks that the model is already there.
With `--api URL` the node at URL pulls into its own store instead (one direct download per
node), and the bar follows its progress. `shoal models list` shows the store with each model's
card status and whether its files are complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from shoal.config import Paths
from shoal.models.cards import CardError, ModelCard, card_for, load_cards
from shoal.models.manifest import build_manifest
from shoal.models.store import HF_CACHE_DIR, ModelStore, validate_model_id
from shoal.ops.client import (
    ApiClient,
    ApiError,
    ApiUnreachable,
    add_api_key_flag,
    api_base,
    cannot_reach,
)

if TYPE_CHECKING:
    from tqdm import tqdm

    from shoal.schema.report import DownloadState

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OFFLINE_ENV = "SHOAL_OFFLINE"


def env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class ProgressBar:
    """A tqdm byte bar on stderr fed by pull's progress snapshots."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def __call__(self, progress: DownloadState) -> None:
        if self._bar is None:
            if progress.status != "downloading":
                return  # failed before the first file: the error says it all
            from tqdm import tqdm

            self._bar = tqdm(
                total=progress.bytes_total,
                unit="B",
                unit_scale=True,
                file=sys.stderr,
                desc=progress.model_id,
            )
        self._bar.total = progress.bytes_total
        self._bar.n = progress.bytes_done
        self._bar.set_postfix_str(
            f"{progress.files_done}/{progress.files_total} {progress.current_file or ''}".rstrip(),
            refresh=True,
        )


def run_pull(args: argparse.Namespace) -> int:
    # huggingface_hub loads only for this command, not for every `shoal` invocation
    from shoal.models.download import PullError, human_bytes, pull

    try:
        model_id = validate_model_id(args.model)
    except ValueError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.api:
        return _pull_on_node(args, model_id)
    store = _store(args)
    include = args.include or card_for(_cards(), model_id).include
    try:
        with ProgressBar() as bar:  # closed before any message below
            path = pull(
                model_id,
                store.dir_for(model_id),
                include=include,
                revision=args.revision,
                offline=args.offline or env_flag(os.environ.get(OFFLINE_ENV)),
                on_progress=bar,
            )
    except PullError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("shoal: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    files = [
        p for p in path.rglob("*") if p.is_file() and HF_CACHE_DIR not in p.relative_to(path).parts
    ]
    size = human_bytes(sum(p.stat().st_size for p in files))
    print(f"{model_id}: {len(files)} files, {size} in {path}")
    return EXIT_OK


def _store(args: argparse.Namespace) -> ModelStore:
    """--models-dir, else SHOAL_MODELS_DIR, else <data dir>/models."""
    if args.models_dir:
        return ModelStore(Path(args.models_dir).expanduser())
    return ModelStore.from_env(Paths.from_env().data)


def _cards() -> dict[str, ModelCard]:
    try:
        return load_cards(Paths.from_env().config)
    except CardError as exc:
        print(f"shoal: model card: {exc}", file=sys.stderr)
        return load_cards(None)


def _pull_on_node(args: argparse.Namespace, model_id: str) -> int:
    """POST /models/pull to a node and follow its progress until the pull ends."""
    base = api_base(args.api)
    try:
        with ApiClient(base, timeout=10, api_key=args.api_key) as api, ProgressBar() as bar:
            api.start_pull(model_id, args.include or [], args.revision)
            while True:
                state = next(d for d in api.store().downloads if d.model_id == model_id)
                bar(state)
                if state.status != "downloading":
                    break
                time.sleep(0.5)
    except ApiError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ApiUnreachable, httpx.HTTPError) as exc:
        print(f"shoal: {cannot_reach(base, exc)}", file=sys.stderr)
        return EXIT_FAILED
    if state.status == "failed":
        print(f"shoal: {state.error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{model_id}: pulled on {base} ({state.files_total} files)")
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    cards = _cards()
    rows = list(store.models())
    print(f"store {store.root}" + "".join(f", read-only {p}" for p in store.readonly))
    if not rows:
        print("  empty: `shoal models pull ORG/NAME` downloads one")
    for stored in rows:
        m = build_manifest(stored.model_id, stored.path)
        state = "ok"
        if m.partials or m.missing:
            state = "partial" if m.partials else f"missing {', '.join(m.missing)}"
        print(
            f"  {stored.model_id:<44} {card_for(cards, stored.model_id).status:<10} "
            f"{m.format:<11} {len(m.files):>4} files {m.total_bytes / 2**20:>10.1f} MiB  "
            f"{state}{'' if stored.writable else '  (read-only)'}"
        )
    return EXIT_OK


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    commands = parser.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    pull_parser = commands.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub into the store",
        description="Download a model from the Hugging Face Hub (or HF_ENDPOINT) into the "
        "store; an interrupted pull resumes where it stopped.",
    )
    pull_parser.add_argument("model", metavar="ORG/NAME", help="the model's Hugging Face id")
    pull_parser.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="only files matching this glob, e.g. '*Q4_K_M.gguf' (repeatable; default: all)",
    )
    pull_parser.add_argument(
        "--revision", default="main", help="branch, tag or commit (default main)"
    )
    pull_parser.add_argument(
        "--offline",
        action="store_true",
        help=f"no network: succeed only if the model is already in the store (env {OFFLINE_ENV})",
    )
    pull_parser.add_argument(
        "--models-dir",
        help="the store to pull into (env SHOAL_MODELS_DIR; default <data dir>/models)",
    )
    pull_parser.add_argument(
        "--api",
        help="have the node at this URL pull into its own store, and follow its progress",
    )
    add_api_key_flag(pull_parser)
    pull_parser.set_defaults(func=run_pull)
    list_parser = commands.add_parser(
        "list", help="the models in this machine's store, with card status and completeness"
    )
    list_parser.add_argument("--models-dir", help="the store (env SHOAL_MODELS_DIR)")
    list_parser.set_defaults(func=run_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = configure(argparse.ArgumentParser(prog="shoal models")).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
