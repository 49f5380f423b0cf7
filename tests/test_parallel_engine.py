"""Sharded instances against the single-process engine, on real processes and real gloo.

Rank 0 runs in this process as the scheduler's executor; the other ranks are runner processes
(`python -m shoal.runner`) meeting it on 127.0.0.1. Pipelines of 2 and 3 ranks and
tensor parallelism must give the single-process greedy tokens, logits within 1e-3 (fp32), each
sequence's solo output while sequences share a batch and move between KV slots, and the
single-process tokens of a seeded sampled sequence; the logprobs a sequence asks for come
back from the sampling rank and are those of its logits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from runner_procs import RunnerProcess, free_port

from shoal.engine.distributed import PeerLostError, join
from shoal.engine.generator import Generator, LocalExecutor
from shoal.engine.lockstep import PipelineExecutor, TensorExecutor
from shoal.engine.sampling import SamplingParams, TokenLogprob
from shoal.engine.sharding import ShardingError, even_layer_ranges, tensor_parallel_config
from shoal.engine.tokenizer import Tokenizer
from shoal.engine.weights import load_model, open_source
from shoal.engine.wire import HeaderCodec, Op, StepHeader
from shoal.runner.build import build_executor, load_rank_model, rendezvous_of
from shoal.runner.spec import RunnerSpec

from engine_helpers import bundled_gguf, save_tiny_model
from test_generator import QUESTIONS, prompt, run

pytestmark = pytest.mark.timeout(240)

GREEDY = SamplingParams(temperature=0)
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=7)


# -- pure parts ---------------------------------------------------------------------------------


def test_step_header_round_trips_through_its_fixed_int64_layout():
    codec = HeaderCodec(max_batch=3)
    headers = [
        StepHeader(Op.NOOP, moves=((2, 0, 17), (1, 0, 5))),
        StepHeader(Op.STOP),
        StepHeader(Op.PREFILL, rows=40, slot=2, ids=(9,), params=SEEDED, inline=False),
        StepHeader(Op.PREFILL, rows=3, ids=(4,), params=SamplingParams(seed=2**64 - 1)),
        StepHeader(
            Op.PREFILL,
            rows=2,
            ids=(5,),
            params=SamplingParams(
                presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.3
            ),
        ),
        StepHeader(Op.PREFILL, rows=2, ids=(6,), params=SamplingParams(logprobs=0)),
        StepHeader(Op.PREFILL, rows=2, ids=(7,), params=SamplingParams(logprobs=20)),
        StepHeader(
            Op.DECODE,
            rows=3,
            ids=(1, 4, 9),
            positions=(30, 7, 12),
            tokens=(5, 6, 7),
            moves=((1, 0, 8),),
            want_logits=True,
        ),
    ]
    for header in headers:
        packed = codec.pack(header)
        assert len(packed) == codec.size
        assert codec.unpack(torch.tensor(packed).tolist()) == header
    with pytest.raises(ValueError, match="too large"):
        codec.pack(StepHeader(Op.DECODE, rows=4, ids=(1, 2, 3, 4), positions=(0, 0, 0, 0)))


def test_tensor_parallel_refuses_heads_that_do_not_divide():
    config = open_source(bundled_gguf()).config  # 9 heads, 3 KV heads
    with pytest.raises(ShardingError, match="attention heads 9, KV heads 3"):
        tensor_parallel_config(config, 2)
    local = tensor_parallel_config(config, 3)
    assert (local.num_heads, local.num_kv_heads) == (3, 1)
    assert local.intermediate_size == config.intermediate_size // 3
    assert even_layer_ranges(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]


# -- a sharded instance with rank 0 here ----------------------------------------------------


@dataclass
class Instance:
    executor: PipelineExecutor | TensorExecutor
    followers: list[RunnerProcess]

    def stop(self) -> None:
        """Rank 0 says stop: every follower must end with "stopped" and exit code 0."""
        self.executor.close()
        for follower in self.followers:
            assert follower.wait_exit(30) == 0, follower.log_tail()
            assert follower.statuses[-1] == "stopped"


@contextmanager
def sharded(
    path: Path, sharding: str, world: int, log_dir: Path, **spec: object
) -> Iterator[Instance]:
    config = open_source(path).config
    if sharding == "pipeline":
        layers = even_layer_ranges(config.num_layers, world)
    else:
        layers = [(0, config.num_layers)] * world
    store_port = free_port()
    specs = [
        RunnerSpec(
            instance_id=f"{sharding}{world}",
            model_id="m",
            model_path=str(path),
            sharding=sharding,
            rank=rank,
            world_size=world,
            layer_range=layers[rank],
            store_host="127.0.0.1",
            store_port=store_port,
            ifname="lo",
            **{"max_batch": 3, "max_seq_len": 128, **spec},
        )
        for rank in range(world)
    ]
    followers = [RunnerProcess(s, log_dir) for s in specs[1:]]
    peers = None
    try:
        peers = join(rendezvous_of(specs[0]))
        source = open_source(path)
        model = load_rank_model(specs[0], source)
        peers.wait_until_all_loaded(120)
        executor = build_executor(specs[0], peers, model, source.config)
        executor.keep_logits = True
        yield Instance(executor, followers)
    finally:
        for follower in followers:
            follower.kill()
        if peers is not None:
            peers.close()


# -- the scheduler's moves, by hand, to see every step's logits ------------------------------


@dataclass
class Seq:
    id: int
    prompt: list[int]
    params: SamplingParams
    length: int  # tokens to generate
    slot: int = -1
    out: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def run_together(executor: LocalExecutor | PipelineExecutor | TensorExecutor, seqs: list[Seq]):
    """Admit every sequence into the next free slot, decode the active ones together, and
    compact the slots (KV moves) whenever one finishes, as the scheduler does."""
    active: list[Seq] = []
    for s in seqs:
        s.slot = len(active)
        s.out.append(executor.prefill(s.id, s.slot, s.prompt, s.params))
        s.logits.append(executor.last_logits[0])
        if s.id in (logprobs := executor.step_logprobs()):
            s.logprobs.append(logprobs[s.id])
        active.append(s)
    while active := [s for s in active if len(s.out) < s.length]:
        for slot, s in enumerate(active):
            if s.slot != slot:
                executor.move_slot(s.slot, slot, len(s.prompt) + len(s.out))
                s.slot = slot
        chosen = executor.decode(
            [s.id for s in active],
            [s.out[-1] for s in active],
            [len(s.prompt) + len(s.out) - 1 for s in active],
        )
        logprobs = executor.step_logprobs()
        for row, (s, token) in enumerate(zip(active, chosen, strict=True)):
            s.out.append(token)
            s.logits.append(executor.last_logits[row])
            if s.id in logprobs:
                s.logprobs.append(logprobs[s.id])
    return seqs


def three_sequences(prompts: list[list[int]]) -> list[Seq]:
    """Greedy with the top 3 logprobs, greedy ending early (its slot is compacted away),
    seeded sampling with the chosen tokens' logprobs."""
    return [
        Seq(1, prompts[0], dataclasses.replace(GREEDY, logprobs=3), 12),
        Seq(2, prompts[1], GREEDY, 4),
        Seq(3, prompts[2], dataclasses.replace(SEEDED, logprobs=0), 12),
    ]


# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" etc.
SMOLLM_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
TINY_PROMPT = [1, 5, 17, 42, 8, 93, 11, 60, 3, 77, 21, 34]
PROMPTS = {
    "smollm": [SMOLLM_PROMPT, SMOLLM_PROMPT[:9], SMOLLM_PROMPT[3:]],
    "smollm-q4": [SMOLLM_PROMPT, SMOLLM_PROMPT[:9], SMOLLM_PROMPT[3:]],
    "qwen3": [TINY_PROMPT, TINY_PROMPT[:5], TINY_PROMPT[2:] + [50, 51]],
    "qwen3_moe": [TINY_PROMPT, TINY_PROMPT[:5], TINY_PROMPT[2:] + [50, 51]],
    "mixtral": [TINY_PROMPT, TINY_PROMPT[:5], TINY_PROMPT[2:] + [50, 51]],
}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict[str, Path]:
    return {
        "smollm": bundled_gguf(),
        "smollm-q4": bundled_gguf(),
        "qwen3": save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3")),
        # a dense layer among the sparse ones: its feed forward splits by width, the others
        # by experts
        "qwen3_moe": save_tiny_model(
            "qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"), mlp_only_layers=[2]
        ),
        "mixtral": save_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral")),
    }


@pytest.fixture(scope="module")
def single_process(model_paths) -> dict[str, list[Seq]]:
    """Each sequence run alone, on the whole model in this process."""
    solo: dict[str, list[Seq]] = {}
    for name, path in model_paths.items():
        model = load_model(path, quantize=QUANTIZE.get(name, "auto"))
        executor = LocalExecutor(model, max_batch=3, max_seq_len=128)
        executor.keep_logits = True
        solo[name] = [run_together(executor, [s])[0] for s in three_sequences(PROMPTS[name])]
    return solo


# smollm: float32, so the split changes nothing but the order of float32 sums (1e-3).
# smollm-q4: its 4-bit layout. The kernels take and give bfloat16 (a logit near 30 moves in
# steps of 0.125), and a tensor split sums three rounded partial outputs, so the same tokens
# and logits within 1.0 (a few such steps).
QUANTIZE = {"smollm": "none", "smollm-q4": "auto"}
TOLERANCE = {"smollm-q4": 1.0}
CASES = [
    ("smollm", "pipeline", 2),
    ("smollm-q4", "pipeline", 2),
    ("smollm-q4", "tensor", 3),
    ("smollm", "pipeline", 3),
    ("smollm", "tensor", 3),  # 9 heads and 3 KV heads: 3 ranks, not 2
    ("qwen3", "pipeline", 2),
    ("qwen3", "pipeline", 3),
    ("qwen3", "tensor", 2),
    ("qwen3_moe", "pipeline", 2),
    ("qwen3_moe", "tensor", 2),  # 2 of the 4 experts on each rank
    ("mixtral", "tensor", 2),
]


@pytest.mark.parametrize(("model", "sharding", "world"), CASES, ids=lambda v: str(v))
def test_sharded_batch_gives_single_process_tokens_and_logits(
    model, sharding, world, model_paths, single_process, tmp_path
):
    quantize = QUANTIZE.get(model, "auto")
    with sharded(model_paths[model], sharding, world, tmp_path, quantize=quantize) as instance:
        together = run_together(instance.executor, three_sequences(PROMPTS[model]))
        instance.stop()
    for shard_seq, solo in zip(together, single_process[model], strict=True):
        assert len(shard_seq.logits) == len(solo.logits) == solo.length
        out, expected = shard_seq.out, solo.out
        if TOLERANCE.get(model, 1e-3) > 1e-3 and solo.params.temperature:
            # a sampled token can fall either side of a draw when logits move by a step;
            # compare up to the first such fork (the sequences are the same seed's)
            fork = next(
                (i for i, (a, b) in enumerate(zip(out, expected, strict=True)) if a != b), len(out)
            )
            out, expected = out[: fork + 1], expected[: fork + 1]
        else:
            assert out == expected, f"sequence {solo.id}"
        for ours, reference in zip(shard_seq.logits[: len(out)], solo.logits, strict=False):
            assert (ours - reference).abs().max().item() < TOLERANCE.get(model, 1e-3)
        asked = shard_seq.params.logprobs
        assert len(shard_seq.logprobs) == (0 if asked is None else solo.length)
        for lp, token, logits in zip(
            shard_seq.logprobs, shard_seq.out, shard_seq.logits, strict=False
        ):
            assert_logprobs_of(lp, token, logits, asked or 0)


def assert_logprobs_of(lp: TokenLogprob, token: int, logits: torch.Tensor, k: int) -> None:
    """`lp` is the token's log-softmax under these logits, with the k likeliest tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    assert lp.token == token and abs(lp.logprob - logp[token].item()) < 1e-4
    assert len(lp.top) == k
    assert [x for _, x in lp.top] == sorted((x for _, x in lp.top), reverse=True)
    for t, x in lp.top:
        assert abs(x - logp[t].item()) < 1e-4
    if k:
        assert abs(lp.top[0][1] - logp.max().item()) < 1e-4


# -- the scheduler over a pipeline ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.load(bundled_gguf(), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def local_generator(smollm_tokenizer):
    gen = Generator(load_model(bundled_gguf()), smollm_tokenizer, max_batch=3, max_seq_len=256)
    gen.start()
    yield gen
    gen.stop()


SHORT = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="class")
def pipeline_generator(smollm_tokenizer, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pipeline-logs")
    # A step timeout of 3 s: the followers outlive longer idle spells only by the heartbeat.
    with sharded(
        bundled_gguf(), "pipeline", 2, logs, max_seq_len=256, heartbeat_s=0.5, step_timeout_s=3
    ) as instance:
        instance.executor.keep_logits = False
        gen = Generator(instance.executor, smollm_tokenizer)
        gen.start()
        yield gen
        gen.stop()
        instance.stop()


class TestSchedulerOverAPipeline:
    """The real scheduler driving a 2-rank pipeline of SmolLM2 (one instance for the class:
    a process belongs to one group at a time)."""

    def test_staggered_requests_equal_single_process_solo_runs(
        self, pipeline_generator, local_generator
    ):
        gen = pipeline_generator
        prompts = [prompt(gen, q) for q in QUESTIONS]
        params = [LONG, SHORT, LONG, SHORT]  # the short ones finish first: slots get compacted
        solo = [
            run(local_generator, p, q).wait().text for p, q in zip(prompts, params, strict=True)
        ]
        first = run(gen, prompts[0], params[0])
        while len(first.events) < 3:
            time.sleep(0.005)
        rest = [run(gen, p, q) for p, q in zip(prompts[1:], params[1:], strict=True)]
        together = [c.wait().text for c in [first, *rest]]  # four requests for three slots
        assert together == solo
        assert gen.stats["max_batch_seen"] == 3

    def test_seeded_sampling_equals_single_process_after_an_idle_spell(
        self, pipeline_generator, local_generator
    ):
        time.sleep(4)  # longer than the step timeout: only the heartbeat keeps the followers
        params = SamplingParams(max_tokens=16, temperature=0.9, seed=11, ignore_eos=True)
        ids = prompt(local_generator, QUESTIONS[1])
        expected = run(local_generator, ids, params).wait().text
        noise = run(pipeline_generator, prompt(pipeline_generator, QUESTIONS[2]), LONG)
        beside = run(pipeline_generator, ids, params).wait()
        assert noise.wait().last.finish_reason == "length"
        assert beside.last.finish_reason == "length" and beside.text == expected


# -- a peer that goes away ------------------------------------------------------------------------


def test_a_vanished_pipeline_rank_ends_requests_with_an_error(smollm_tokenizer, tmp_path):
    with sharded(bundled_gguf(), "pipeline", 2, tmp_path, step_timeout_s=10) as instance:
        gen = Generator(instance.executor, smollm_tokenizer)
        gen.start()
        try:
            params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            running = run(gen, prompt(gen, QUESTIONS[3]), params)
            while len(running.events) < 3:
                time.sleep(0.005)
            instance.followers[0].kill()
            assert running.done.wait(30), "the request hung after its peer died"
            assert running.last.finish_reason == "error"
            assert "rank 1" in running.last.error
            later = run(gen, prompt(gen, QUESTIONS[0]), params)  # fails at once, no hang
            assert later.done.wait(10) and later.last.finish_reason == "error"
            assert instance.executor.failure is not None
        finally:
            gen.stop()


def test_a_vanished_tensor_rank_fails_the_step(model_paths, tmp_path):
    with sharded(model_paths["qwen3"], "tensor", 2, tmp_path, step_timeout_s=10) as instance:
        executor = instance.executor
        first = executor.prefill(1, 0, TINY_PROMPT, GREEDY)
        instance.followers[0].kill()
        with pytest.raises(PeerLostError, match="rank|all-reduce|broadcast"):
            for step in range(20):  # the first step after the kill may still be sent out
                executor.decode([1], [first], [len(TINY_PROMPT) + step])
        with pytest.raises(PeerLostError):  # broken for good: no step runs half-way again
            executor.decode([1], [first], [len(TINY_PROMPT)])
