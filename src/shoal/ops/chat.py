"""`shoal chat`: a terminal client for a node's OpenAI-compatible API.

Interactive by default (conversation history, streamed tokens, /reset, /exit, Ctrl-C stops an
answer, Ctrl-D quits); one-shot with `-m "question"` or with a question piped on stdin. Talks
to the node through the typed API client (ops.client), whose streams httpx-sse reads.

The timing helpers here are shared with `shoal bench`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from shoal.ops.client import (  # noqa: F401 - SSE_DONE, parse_sse_line, read_chunk: the API
    DEFAULT_API,
    DEFAULT_TIMEOUT,
    SSE_DONE,
    START_HINT,
    ApiClient,
    ApiError,
    ApiUnreachable,
    ChunkDelta,
    add_api_key_flag,
    api_base,
    error_message,
    error_text,
    parse_sse_line,
    read_chunk,
)

CLIENT_TIMEOUT = DEFAULT_TIMEOUT

EXIT_OK, EXIT_API_ERROR, EXIT_UNREACHABLE = 0, 1, 2

HELP_LINE = "/reset clears the conversation · /exit or Ctrl-D quits · Ctrl-C stops an answer"


# ---- pure helpers ----------------------------------------------------------------------------


def decode_rate(completion_tokens: int, ttft_s: float | None, total_s: float) -> float | None:
    """Tokens after the first over the time after the first: the steady decode speed."""
    if ttft_s is None or completion_tokens < 2 or total_s <= ttft_s:
        return None
    return (completion_tokens - 1) / (total_s - ttft_s)


@dataclass(frozen=True)
class StreamResult:
    text: str
    prompt_tokens: int | None
    completion_tokens: int
    ttft_s: float | None
    total_s: float
    finish_reason: str | None

    @property
    def tokens_per_s(self) -> float | None:
        return decode_rate(self.completion_tokens, self.ttft_s, self.total_s)


def format_stats(result: StreamResult) -> str:
    rate = result.tokens_per_s
    parts = [f"{result.completion_tokens} tokens"]
    parts.append(f"{rate:.1f} tok/s" if rate is not None else "tok/s n/a")
    ttft = result.ttft_s
    parts.append(f"TTFT {ttft:.2f} s" if ttft is not None else "no tokens")
    if result.finish_reason not in (None, "stop"):
        parts.append(f"finish: {result.finish_reason}")
    return " · ".join(parts)


# ---- HTTP ------------------------------------------------------------------------------------


def stream_request(
    api: ApiClient,
    body: dict[str, Any],
    on_text: Callable[[str], None],
    clock: Callable[[], float] = time.perf_counter,
) -> StreamResult:
    """Stream a chat completion and hand text to on_text as it arrives.

    A KeyboardInterrupt passes through after the stream has closed the response, so the
    server sees the disconnect and stops generating."""
    base = api.base
    started = clock()
    ttft: float | None = None
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    finish: str | None = None
    chunks_with_text = 0
    try:
        with closing(api.chat_stream(body)) as chunks:
            for chunk in chunks:
                if chunk.error:
                    raise ApiError(chunk.error)
                if chunk.text:
                    if ttft is None:
                        ttft = clock() - started
                    chunks_with_text += 1
                    pieces.append(chunk.text)
                    on_text(chunk.text)
                finish = chunk.finish_reason or finish
                usage = chunk.usage or usage
    except httpx.TimeoutException as exc:
        raise ApiError(f"no answer from {base} in time ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:  # e.g. the server went away mid-stream
        raise ApiError(f"the stream from {base} broke: {exc}") from exc
    except ValueError as exc:
        raise ApiError(str(exc)) from exc
    total = clock() - started
    # Without usage (a server that ignores include_usage) a text chunk is our best token count.
    completion = int(usage["completion_tokens"]) if usage else chunks_with_text
    prompt = int(usage["prompt_tokens"]) if usage else None
    return StreamResult("".join(pieces), prompt, completion, ttft, total, finish)


def first_model(api: ApiClient) -> str:
    try:
        models = api.models()
    except httpx.HTTPError as exc:
        raise ApiError(f"GET /v1/models failed: {exc}") from exc
    if not models:
        raise ApiError(f"{api.base} serves no model yet; check `shoal run` output")
    return models[0]


# ---- the command -----------------------------------------------------------------------------


@dataclass
class ChatSession:
    client: ApiClient | httpx.Client  # an httpx.Client is wrapped as an ApiClient at base
    base: str
    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.client, httpx.Client):
            self.client = ApiClient(self.base, http=self.client)
        self.api: ApiClient = self.client
        self.history: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.history,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def ask(self, question: str, on_text: Callable[[str], None]) -> StreamResult:
        """One turn; the history keeps the turn only when the answer completed."""
        self.history.append({"role": "user", "content": question})
        try:
            result = stream_request(self.api, self.body(), on_text)
        except BaseException:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": result.text})
        return result


def _dim(text: str, stream: TextIO) -> str:
    if stream.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[2m{text}\033[0m"
    return text


def _printer(out: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write


def one_shot(session: ChatSession, question: str, out: TextIO, err: TextIO) -> int:
    result = session.ask(question, _printer(out))
    out.write("\n")
    out.flush()
    err.write(_dim(format_stats(result), err) + "\n")  # stderr: scripts keep a clean answer
    return EXIT_OK


def repl(
    session: ChatSession,
    out: TextIO,
    read_line: Callable[[str], str] = input,
) -> int:
    out.write(_dim(f"shoal chat · {session.model} at {session.base}\n{HELP_LINE}", out) + "\n")
    while True:
        try:
            line = read_line(">>> ").strip()
        except EOFError:
            out.write("\n")
            return EXIT_OK
        except KeyboardInterrupt:  # at the prompt Ctrl-C only clears the line
            out.write("\n")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return EXIT_OK
        if line == "/reset":
            session.reset()
            out.write(_dim("(conversation cleared)", out) + "\n")
            continue
        if line.startswith("/"):
            out.write(_dim(f"unknown command {line.split()[0]}; {HELP_LINE}", out) + "\n")
            continue
        try:
            result = session.ask(line, _printer(out))
        except KeyboardInterrupt:
            out.write("\n" + _dim("(answer stopped; this turn is not kept)", out) + "\n")
            continue
        except ApiError as exc:
            out.write(f"\nerror: {exc}\n")
            continue
        out.write("\n" + _dim(format_stats(result), out) + "\n")


def run(args: argparse.Namespace) -> int:
    base = api_base(args.api)
    try:
        with ApiClient(base, timeout=CLIENT_TIMEOUT, api_key=args.api_key) as api:
            model = args.model if args.model is not None else first_model(api)
            session = ChatSession(api, base, model, args.system, args.temperature, args.max_tokens)
            question = args.message
            if question is None and not sys.stdin.isatty():
                question = sys.stdin.read()
            if question is not None:
                if not question.strip():
                    raise ApiError("nothing to send: the message is empty")
                return one_shot(session, question, sys.stdout, sys.stderr)
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:
                pass
            return repl(session, sys.stdout)
    except ApiUnreachable as exc:
        print(exc, file=sys.stderr)
        return EXIT_UNREACHABLE
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    except KeyboardInterrupt:  # Ctrl-C in one-shot mode
        print(file=sys.stderr)
        return 130


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--api",
        default=os.environ.get("SHOAL_API", DEFAULT_API),
        help=f"base URL of a node's API (env SHOAL_API; default {DEFAULT_API})",
    )
    add_api_key_flag(parser)
    parser.add_argument("--model", help="model id (default: the first one of /v1/models)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    parser.add_argument("--max-tokens", type=int, help="at most this many tokens per answer")
    parser.add_argument(
        "-m", "--message", help="ask one question, print the answer and exit (stdin works too)"
    )
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = configure(argparse.ArgumentParser(prog="shoal chat")).parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
