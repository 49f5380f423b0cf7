"""`shoal bootstrap MODEL`: the operator runbook's phase gates as one command.

preflight -> audit -> canary -> join -> placement -> transport -> first_chat (-> bench). Each
phase must pass before the next runs; the first failure stops the run with the command to try
next. After every phase the run ledger (ledger.json) and the hand-off page (RUN.md) are
rewritten in the report dir (ops.run_ledger), so the next operator, or `--resume`, goes on
where this run stopped.

Each phase here fetches what it needs over the nodes' APIs (no SSH) and hands it to its pure
verdict (`judge_*` in ops.phase_gates).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from shoal.config import Paths
from shoal.models.store import dir_name
from shoal.ops.bootstrap_phases import (
    API_TIMEOUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    PHASE_FUNCTIONS,
    TITLES,
    Context,
    Unreachable,
)
from shoal.ops.client import DEFAULT_API, START_HINT, ApiClient, add_api_key_flag, api_base
from shoal.ops.phase_gates import FAIL, PHASES, Options, PhaseResult, conclude, gate
from shoal.ops.run_ledger import (
    Ledger,
    handoff_fields,
    now_text,
    phase_order,
    plan_phases,
    read_ledger,
    render_handoff,
    write_ledger,
)

# -- the command -------------------------------------------------------------------------------


def bootstrap(opts: Options, say: Callable[[str], None] = print) -> int:
    previous = read_ledger(opts.report_dir)
    same = previous if previous is not None and previous.model == opts.model else None
    carried = same if opts.resume or opts.only else None
    bench = opts.bench or opts.only == "bench"
    kept, to_run = plan_phases(
        phase_order(bench), carried.phases if carried else [], resume=opts.resume, only=opts.only
    )
    ledger = Ledger(opts.model, opts.api, phases=kept)
    if carried:
        ledger.nodes, ledger.model_dirs = carried.nodes, carried.model_dirs
        ledger.instance_id = carried.instance_id
    order = phase_order(bench or any(p.name == "bench" for p in kept))  # the hand-off's order
    say(f"bootstrap {opts.model} via {opts.api}; report in {opts.report_dir}")
    for p in kept if opts.resume else ():
        say(f"SKIP {p.name}: passed at {p.finished_at} (ledger); --resume does not repeat it")
    code = EXIT_OK
    with ApiClient(opts.api, timeout=API_TIMEOUT, api_key=opts.api_key) as api:
        ctx = Context(opts, api, ledger, say, same.model_dirs if same else {})
        write_ledger(opts.report_dir, ledger, order)
        for number, name in enumerate(to_run, start=1):
            say(f"[{number}/{len(to_run)}] {name}: {TITLES[name]}")
            started, clock = now_text(), time.monotonic()
            try:
                result = PHASE_FUNCTIONS[name](ctx)
            except Unreachable as exc:
                code = EXIT_UNREACHABLE
                result = conclude(
                    name,
                    [gate("API", False, str(exc))],
                    next_command=f"{START_HINT}; then {opts.command('--resume')}",
                )
            result = replace(
                result, started_at=started, finished_at=now_text(), seconds=time.monotonic() - clock
            )
            ledger.record(result)
            write_ledger(opts.report_dir, ledger, order)
            _print_result(result, say)
            if result.status == FAIL:
                code = code or EXIT_FAILED
                break
    fields = handoff_fields(ledger, order)
    if code:
        say(f"NEXT_COMMAND: {fields['NEXT_COMMAND']}")
        if "--resume" not in fields["NEXT_COMMAND"]:
            say(f"after the fix: {opts.command('--resume')}")
    say(f"\n{render_handoff(fields)}")
    say(f"ledger: {opts.report_dir / 'ledger.json'}\nhand-off: {opts.report_dir / 'RUN.md'}")
    return code


def _print_result(result: PhaseResult, say: Callable[[str], None]) -> None:
    for line in result.evidence[1:]:
        say(f"  {line}")
    headline = result.evidence[0] if result.evidence else ""
    say(f"{result.status.upper()} {result.name} ({result.seconds:.1f} s): {headline}")


def options_from(args: argparse.Namespace) -> Options:
    default_dir = Paths.from_env().data / "bootstrap-runs" / dir_name(args.model)
    fields = {k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__}
    fields["api"] = api_base(args.api)
    fields["report_dir"] = Path(args.report_dir).expanduser() if args.report_dir else default_dir
    return Options(**fields)


def run(args: argparse.Namespace) -> int:
    return bootstrap(options_from(args), say=lambda line: print(line, flush=True))


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add("model", help="model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    add(
        "--api",
        default=os.environ.get("SHOAL_API", DEFAULT_API),
        help=f"base URL of any node's API (env SHOAL_API; default {DEFAULT_API})",
    )
    add_api_key_flag(parser)
    add("--min-nodes", type=int, default=2, help="nodes the cluster and instance need (default 2)")
    add("--sharding", help="Pipeline or Tensor (default: placement's choice)")
    add("--instance-meta", help="GlooInstance, NcclInstance, MlxRingInstance or MlxJacclInstance")
    add(
        "--allow-blocked",
        action="store_true",
        help="go on with a model whose card says status = blocked",
    )
    add(
        "--expect-shards",
        type=int,
        help="safetensors shards (or GGUF files) each node must have (default: the card's)",
    )
    add("--hash", action="store_true", help="audit sha256 too (reads every byte)")
    add("--min-disk-gb", type=float, help="free disk each node needs (default: the card's)")
    add(
        "--join-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for --min-nodes nodes (default 60)",
    )
    add(
        "--ready-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for every runner to be ready (default 300)",
    )
    add("--bench", action="store_true", help="end with shoal bench (results in the report dir)")
    add("--bench-args", default="", help="more flags for shoal bench, as one string")
    add(
        "--report-dir",
        help="where ledger.json and RUN.md go (default: <data dir>/bootstrap-runs/<org--name>)",
    )
    add(
        "--resume",
        action="store_true",
        help="skip the phases the ledger says passed; run from the first that did not",
    )
    add(
        "--fast",
        action="store_true",
        help="strict-only checks (drift, disk threshold, shard count, late joiners) only warn",
    )
    add("--only", choices=PHASES, help="run this one phase")
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(configure(argparse.ArgumentParser(prog="shoal bootstrap")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
