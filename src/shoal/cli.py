"""The `shoal` command: `shoal run` serves this machine; other commands talk to a node."""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from shoal import __version__
from shoal.config import StartupError, add_run_flags, settings_from
from shoal.ops import audit, bench, bootstrap, chat, doctor, models

CLIENT_COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "chat": (chat, "chat with the models a node serves"),
    "bench": (bench, "measure throughput and latency of a node's or a cluster's API"),
    "doctor": (doctor, "show the cluster as a node sees it"),
    "audit": (audit, "check a model's files are complete and identical on every node"),
    "models": (models, "manage the models in this machine's store"),
    "bootstrap": (
        bootstrap,
        "bring a model up across the cluster through the runbook's phase gates",
    ),
}


def _run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from shoal.node import run  # torch and the engine load only for commands that need them

    run(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve models from this machine (OpenAI API)",
        description="Serve models from this machine over an OpenAI-compatible API.",
    )
    add_run_flags(run)
    run.set_defaults(func=_run)
    # client commands: each module's docstring describes it and its configure() adds its flags
    for name, (module, help) in CLIENT_COMMANDS.items():
        doc = module.__doc__ or ""
        module.configure(commands.add_parser(name, help=help, description=doc.split("\n\n")[0]))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StartupError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
