"""MLX instances across processes on loopback: two runner ranks over mx.distributed's ring give
the same greedy text as one process running mlx-lm directly, as a pipeline and as tensor
shards, for a dense model (qwen2) and a 4-bit MoE (qwen3_moe); a rank started 10 s late still
joins; a follower whose rank 0 vanishes fails with a reason. Plus the pure parts (the ring's
host list, JACCL's device matrix, the pipeline split) from tables."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import openai
import pytest
from runner_procs import free_port

from shoal.engine.sharding import even_layer_ranges
from shoal.engine.tokenizer import Tokenizer
from shoal.runner.spec import RunnerSpec

from engine_helpers import bundled_gguf

mx = pytest.importorskip("mlx.core", reason="mlx is not installed: make test installs shoal[mlx]")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed: make test installs shoal[mlx]")

from mlx_lm.generate import generate_step  # noqa: E402
from test_engine_mlx import tiny_mlx_dir  # noqa: E402

from shoal.engine_mlx.group import group_env, jaccl_devices, pipeline_split, ring_hosts  # noqa: E402
from shoal.engine_mlx.load import load  # noqa: E402

pytestmark = pytest.mark.timeout(300)

LAYERS = 3
PROMPT = "The capital of France is"
TOKENS = 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_gguf(bundled_gguf(), tmp_path_factory.mktemp("tokenizers"))


def tiny_dir(root: Path, arch: str, bits: int | None, tokenizer: Tokenizer) -> Path:
    """A tiny random model with SmolLM2's tokenizer (so a runner can serve text)."""
    # 64-wide experts: two 4-bit groups of 32, so the tensor shards split them evenly
    wide = {"moe_intermediate_size": 64} if arch == "qwen3_moe" else {}
    directory = tiny_mlx_dir(root / arch, arch, bits, vocab_size=tokenizer.vocab_size, **wide)
    tokenizer.save_hf_dir(directory)
    return directory


@pytest.fixture(
    scope="module",
    params=[("qwen2", None), ("qwen3_moe", 4), ("llama", None)],
    ids=["qwen2", "qwen3_moe-4bit", "llama-staged"],  # llama: shoal's stages, not mlx-lm's
)
def model_dir(request, tmp_path_factory, tokenizer) -> Path:
    return tiny_dir(tmp_path_factory.mktemp("mlx"), *request.param, tokenizer)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer) -> Path:
    return tiny_dir(tmp_path_factory.mktemp("mlx"), "qwen3_moe", 4, tokenizer)


def reference_text(directory: Path, tokenizer: Tokenizer) -> str:
    """One process, mlx-lm's own greedy decode of the prompt as the endpoint encodes it."""
    model, config = load(directory)
    ids = tokenizer.encode(PROMPT)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    step = generate_step(mx.array(ids), model, max_tokens=TOKENS, sampler=lambda x: x.argmax(-1))
    out = []
    for token, _ in step:
        if int(token) in config.eos_token_ids:
            break
        out.append(int(token))
    return tokenizer.decode(out)


def ring_specs(directory: Path, name: str, sharding: str, world: int = 2) -> list[RunnerSpec]:
    layers = even_layer_ranges(LAYERS, world) if sharding == "pipeline" else [(0, LAYERS)] * world
    store_port = free_port()
    return [
        RunnerSpec(
            instance_id=name,
            model_id="tiny",
            model_path=str(directory),
            sharding=sharding,
            backend="ring",
            engine="mlx",
            rank=rank,
            world_size=world,
            layer_range=span,
            store_host="127.0.0.1",
            store_port=store_port,
            ifname="lo",
            rank_hosts=("127.0.0.1",) * world,
            max_batch=2,
            max_seq_len=256,
        )  # fmt: skip
        for rank, span in enumerate(layers)
    ]


@pytest.mark.parametrize("sharding", ["pipeline", "tensor"])
def test_two_ring_ranks_decode_what_one_mlx_lm_process_decodes(
    sharding, model_dir, tokenizer, launch
):
    expected = reference_text(model_dir, tokenizer)
    rank0, rank1 = (launch(s) for s in ring_specs(model_dir, f"ring-{sharding}", sharding))
    port = rank0.wait_status("ready", 180)["port"]
    rank1.wait_status("ready", 20)  # the warm-up generation ran through rank 1 too
    for runner in (rank0, rank1):  # loading reported layer by layer: this rank's layers only
        start, end = runner.spec.layer_range
        progress = [tuple(line["layers"]) for line in runner.lines if line.get("layers")]
        assert progress == [(i, end - start) for i in range(1, end - start + 1)], runner.lines
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60)
    for _ in range(2):  # the second request finds the batch cache of the first one gone
        reply = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=TOKENS, temperature=0
        )
        assert reply.choices[0].text == expected
    for runner in (rank0, rank1):
        runner.signal(signal.SIGTERM)
    for runner in (rank0, rank1):
        assert runner.wait_exit(30) == 0 and runner.statuses[-1] == "stopped"


def test_a_ring_rank_started_ten_seconds_late_still_joins(moe_dir, tokenizer, launch):
    specs = ring_specs(moe_dir, "ring-late", "pipeline")
    rank0 = launch(specs[0])
    time.sleep(10)
    rank1 = launch(specs[1])
    port = rank0.wait_status("ready", 180)["port"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60)
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].text == reference_text(moe_dir, tokenizer)

    rank0.kill()  # rank 0 vanishes: the follower fails with a reason instead of hanging
    failed = rank1.wait_status("failed", 60)
    assert "rank" in failed["reason"] or "MLX group" in failed["reason"], failed


def test_a_rank_that_cannot_listen_on_its_placed_address_fails_both_ranks_naming_it(
    moe_dir, launch
):
    specs = ring_specs(moe_dir, "ring-unplaced", "pipeline")
    hosts = ("127.0.0.1", "10.255.255.1")  # not an address of this machine
    rank0, rank1 = (launch(s.model_copy(update={"rank_hosts": hosts})) for s in specs)
    failed = rank1.wait_status("failed", 60)["reason"]
    assert "rank 1 cannot listen on 10.255.255.1" in failed and "interface lo" in failed, failed
    assert "cannot listen on 10.255.255.1" in rank0.wait_status("failed", 30)["reason"]


# -- the pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "hosts"),
    [
        (["10.0.0.1:5000", "10.0.0.2:5001"], [["10.0.0.2:5001"], ["10.0.0.1:5000"]]),
        (["a:1", "b:2", "c:3"], [["c:3"], ["b:2"], ["a:1"]]),
    ],
)
def test_the_ring_host_list_is_in_mlx_rank_order(listen, hosts):
    assert ring_hosts(listen) == hosts


def test_the_jaccl_device_matrix_is_in_mlx_rank_order():
    shoal = [
        [None, "rdma_en2", "rdma_en3"],
        ["rdma_en4", None, "rdma_en5"],
        ["rdma_en6", "rdma_en7", None],
    ]
    assert jaccl_devices(shoal) == [
        [None, "rdma_en7", "rdma_en6"],
        ["rdma_en5", None, "rdma_en4"],
        ["rdma_en3", "rdma_en2", None],
    ]


@pytest.mark.parametrize(
    ("start", "end", "layers", "rank", "world", "split"),
    [
        (0, 2, 3, 0, 2, [1, 2]),  # mlx rank 1 (shoal rank 0) holds the first layers
        (2, 3, 3, 1, 2, [1, 2]),
        (0, 4, 10, 0, 3, [5, 1, 4]),
        (4, 7, 10, 1, 3, [3, 3, 4]),
        (7, 10, 10, 2, 3, [3, 6, 1]),
    ],
)
def test_the_pipeline_split_gives_this_rank_its_planned_layers(
    start, end, layers, rank, world, split
):
    assert pipeline_split(start, end, layers, rank, world) == split
    m = world - 1 - rank
    assert sum(split) == layers and sum(split[m + 1 :]) == start and split[m] == end - start


def test_a_pipeline_split_without_a_layer_for_every_rank_is_refused():
    with pytest.raises(ValueError, match="at least one layer"):
        pipeline_split(0, 3, 3, 0, 2)


@pytest.mark.parametrize(
    ("backend", "rank", "file_var", "content", "extra"),
    [
        ("ring", 0, "MLX_HOSTFILE", [["10.0.0.2:5001"], ["10.0.0.1:5000"]], {}),
        ("jaccl", 1, "MLX_IBV_DEVICES", [[None, "rdma_en3"], ["rdma_en2", None]],
         {"MLX_JACCL_COORDINATOR": "10.0.0.1:5000"}),
    ],
)  # fmt: skip
def test_the_group_environment_mx_distributed_reads(
    backend, rank, file_var, content, extra, tmp_path
):
    listen = ["10.0.0.1:5000", "10.0.0.2:5001"]  # ring: each rank; jaccl: rank 0 first
    devices = [[None, "rdma_en2"], ["rdma_en3", None]]  # shoal rank order
    env = group_env(backend, rank, 2, listen, devices, str(tmp_path))
    assert env["MLX_RANK"] == str(1 - rank)  # shoal rank r is mlx rank world-1-r
    assert json.loads(Path(env[file_var]).read_text()) == content
    assert {k: v for k, v in env.items() if k not in ("MLX_RANK", file_var)} == extra
