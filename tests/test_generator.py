"""Continuous batching on the bundled model: batched output equals one-at-a-time output."""

from __future__ import annotations

import threading
import time

import pytest

from shoal.engine.generator import ContextLengthError, Event, Generator
from shoal.engine.sampling import SamplingParams
from shoal.engine.tokenizer import Tokenizer
from shoal.engine.weights import load_model

from engine_helpers import bundled_gguf

pytestmark = pytest.mark.timeout(300)

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue? Answer in one sentence, please, and be precise about it.",
]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path = bundled_gguf()
    tokenizer = Tokenizer.load(path, tmp_path_factory.mktemp("tok"))
    # float32: batched rows equal solo ones bit for bit only without the bfloat16 activations
    # of the quantized kernels (test_quant holds quantized batching to its tolerance)
    model = load_model(path, quantize="none")
    gen = Generator(model, tokenizer, max_batch=3, max_seq_len=256)
    gen.start()
    yield gen
    gen.stop()


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason:
            self.done.set()

    def wait(self) -> Collector:
        assert self.done.wait(120), "generation did not finish"
        return self

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def last(self) -> Event:
        return self.events[-1]


def prompt(gen: Generator, question: str) -> list[int]:
    return gen.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def run(gen: Generator, ids: list[int], params: SamplingParams) -> Collector:
    c = Collector()
    gen.submit(ids, params, c)
    return c


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_batched_and_staggered_requests_equal_solo_runs(generator):
    prompts = [prompt(generator, q) for q in QUESTIONS]
    solo = [run(generator, p, GREEDY).wait().text for p in prompts]
    # four requests for three slots: one waits, and the others join while decoding runs
    first = run(generator, prompts[0], GREEDY)
    while len(first.events) < 5:
        time.sleep(0.005)
    rest = [run(generator, p, GREEDY) for p in prompts[1:]]
    together = [c.wait().text for c in [first, *rest]]
    assert together == solo
    assert generator.stats["max_batch_seen"] == 3


def test_greedy_answer_names_paris(generator):
    c = run(generator, prompt(generator, QUESTIONS[0]), SamplingParams(temperature=0)).wait()
    assert "Paris" in c.text
    assert c.last.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(generator):
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True)
    ids = prompt(generator, QUESTIONS[1])
    alone = run(generator, ids, params).wait().text
    noise = run(generator, prompt(generator, QUESTIONS[2]), GREEDY)
    beside = run(generator, ids, params).wait().text
    noise.wait()
    assert alone == beside


def test_max_tokens_and_stop_strings(generator):
    ids = prompt(generator, QUESTIONS[0])
    limited = run(generator, ids, SamplingParams(max_tokens=3, temperature=0)).wait()
    assert limited.last.finish_reason == "length" and limited.last.completion_tokens == 3
    full = run(generator, ids, SamplingParams(temperature=0)).wait().text
    stop = full.split()[2]
    stopped = run(generator, ids, SamplingParams(temperature=0, stop=(stop,))).wait()
    assert stopped.last.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_cancel_frees_the_slot(generator):
    c = run(
        generator,
        prompt(generator, QUESTIONS[3]),
        SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
    )
    while not c.events:
        time.sleep(0.005)
    generator.cancel(next(s for s in generator._active if s.on_event is c))
    c.wait()
    assert c.last.finish_reason == "cancelled"
    assert c.last.completion_tokens < 200


def test_context_window_is_enforced(generator):
    with pytest.raises(ContextLengthError, match="context window is 256"):
        generator.submit([1] * 256, GREEDY, Collector())
    ids = [1] * 250
    c = run(generator, ids, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)).wait()
    assert c.last.finish_reason == "length" and c.last.completion_tokens == 6
