"""The MLX engine (shoal.engine_mlx) on mlx[cpu]: tiny random models built with mlx-lm's own
classes (dense llama, MoE qwen3_moe, each also 4-bit quantized) decode the same greedy tokens
through shoal's batched executor as mlx-lm's own generate_step, alone and batched; the bundled
SmolLM2 converted from GGUF answers "Paris"; a node started with --engine mlx serves it to the
openai client; bad dirs are refused naming what is wrong."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from shoal.config import Paths, RunSettings, StartupError
from shoal.engine.config import UnsupportedModelError
from shoal.engine.sampling import SamplingParams
from shoal.runner.spec import pick_engine

from engine_helpers import bundled_gguf

mx = pytest.importorskip("mlx.core", reason="mlx is not installed: make test installs shoal[mlx]")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed: make test installs shoal[mlx]")

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import _get_classes, quantize_model, save_model  # noqa: E402

from shoal.engine_mlx import executor as executor_module  # noqa: E402
from shoal.engine_mlx.convert import DONE, convert_gguf  # noqa: E402
from shoal.engine_mlx.executor import MlxExecutor  # noqa: E402
from shoal.engine_mlx.load import MlxModelError, check_dir, load, supports  # noqa: E402

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_tokens=64, temperature=0)
STEPS = 12

TINY = {
    "llama": {"intermediate_size": 96},
    "qwen2": {"intermediate_size": 96},  # dense, and mlx-lm's own class can pipeline it
    "qwen3_moe": {
        "intermediate_size": 96,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
    },
}


def tiny_mlx_dir(directory: Path, arch: str, bits: int | None, **overrides: object) -> Path:
    """A random model of mlx-lm's class for `arch`, saved as mlx-community publishes one."""
    config = {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": 256,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 512,
        **TINY[arch],
        **overrides,
    }
    mx.random.seed(7)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if bits is not None:
        model, quantized = quantize_model(model, config, group_size=32, bits=bits)
        config.update(quantized)
    mx.eval(model.parameters())
    directory.mkdir(parents=True)
    save_model(directory, model)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def reference_tokens(model, prompt: list[int], steps: int = STEPS) -> list[int]:
    """mlx-lm's own greedy decode of the prompt."""
    step = generate_step(mx.array(prompt), model, max_tokens=steps, sampler=lambda x: x.argmax(-1))
    return [int(token) for token, _ in step]


def shoal_tokens(executor: MlxExecutor, prompts: dict[int, list[int]], steps: int = STEPS):
    """Greedy tokens of every prompt, prefilled one by one and then decoded as one batch."""
    out = {i: [executor.prefill(i, i, p, GREEDY)] for i, p in prompts.items()}
    for _ in range(steps - 1):
        ids = list(out)
        positions = [len(prompts[i]) + len(out[i]) - 1 for i in ids]
        tokens = executor.decode(ids, [out[i][-1] for i in ids], positions)
        for i, token in zip(ids, tokens, strict=True):
            out[i].append(token)
    return out


@pytest.fixture(
    scope="module",
    params=[("llama", None), ("llama", 4), ("qwen3_moe", None), ("qwen3_moe", 4)],
    ids=lambda p: f"{p[0]}-{p[1] or 16}bit",
)
def tiny(request, tmp_path_factory):
    arch, bits = request.param
    directory = tiny_mlx_dir(tmp_path_factory.mktemp("mlx") / arch, arch, bits)
    model, config = load(directory)
    return model, config, bits


def test_greedy_tokens_match_mlx_lm_alone_and_batched(tiny):
    model, config, bits = tiny
    if bits is not None:  # quantized layers stay quantized in memory
        assert "scales" in dict(model.model.layers[0].self_attn.q_proj.parameters())
    short, long = [1, 5, 9, 2], [3, 14, 15, 92, 65, 35, 89, 79, 32]
    expected = {0: reference_tokens(model, short), 1: reference_tokens(model, long)}
    alone = {i: shoal_tokens(MlxExecutor(model, config, 4, 256), {i: p})[i]
             for i, p in enumerate([short, long])}  # fmt: skip
    assert alone == expected
    # two rows of different lengths share one left-padded batch cache
    assert shoal_tokens(MlxExecutor(model, config, 4, 256), {0: short, 1: long}) == expected


def test_logprobs_are_mlx_lms_own_beside_a_row_that_asks_none(tiny):
    model, config, _ = tiny
    prompt = [3, 14, 15, 92, 65]
    step = generate_step(mx.array(prompt), model, max_tokens=4, sampler=lambda x: x.argmax(-1))
    expected = [(int(token), np.array(logp.astype(mx.float32))) for token, logp in step]
    executor = MlxExecutor(model, config, 4, 256)
    asking = dataclasses.replace(GREEDY, logprobs=2)
    out = [executor.prefill(1, 0, prompt, asking)]
    found = [executor.step_logprobs()[1]]
    executor.prefill(2, 1, [1, 5, 9, 2], GREEDY)
    assert set(executor.step_logprobs()) == set()  # only the asking rows, only this step
    other = 0
    for _ in range(3):
        tokens = executor.decode([1, 2], [out[-1], other], [0, 0])
        out.append(tokens[0])
        other = tokens[1]
        assert set(executor.step_logprobs()) == {1}
        found.append(executor.step_logprobs()[1])
    assert out == [token for token, _ in expected]
    for lp, (token, logp) in zip(found, expected, strict=True):
        assert lp.token == token and lp.logprob == pytest.approx(float(logp[token]), abs=1e-4)
        assert [t for t, _ in lp.top][0] == token
        assert [x for _, x in lp.top] == pytest.approx(sorted(logp, reverse=True)[:2], abs=1e-4)


def test_a_finished_row_leaves_the_batch_and_the_others_go_on(tiny):
    model, config, _ = tiny
    prompts = {0: [1, 5, 9, 2], 1: [3, 14, 15, 92, 65], 2: [7, 7, 7]}
    executor = MlxExecutor(model, config, 4, 256)
    out = {i: [executor.prefill(i, i, p, GREEDY)] for i, p in prompts.items()}
    for step in range(STEPS - 1):
        ids = [i for i in out if not (i == 1 and step >= 2)]  # sequence 1 finished early
        tokens = executor.decode(ids, [out[i][-1] for i in ids], [0] * len(ids))
        for i, token in zip(ids, tokens, strict=True):
            out[i].append(token)
    assert out[0] == reference_tokens(model, prompts[0])
    assert out[2] == reference_tokens(model, prompts[2])
    assert out[1] == reference_tokens(model, prompts[1], 3)


def test_a_prompt_longer_than_one_prefill_chunk_decodes_the_same(tiny, monkeypatch):
    model, config, _ = tiny
    monkeypatch.setattr(executor_module, "PREFILL_CHUNK", 4)
    prompt = list(range(3, 26))
    got = shoal_tokens(MlxExecutor(model, config, 2, 256), {0: prompt})[0]
    assert got == reference_tokens(model, prompt)


@pytest.mark.parametrize(
    ("arch", "tensor", "pipeline"),
    [
        ("llama", True, True),  # Model.shard; no mlx-lm pipeline, shoal stages it
        ("qwen3", True, True),  # likewise
        ("qwen3_moe", True, True),  # its text model mixes in mlx-lm's PipelineMixin
        ("kimi_k25", True, True),  # wraps deepseek_v3's text model, which pipelines
        ("mixtral", False, False),  # mlx-lm has neither for it
        ("not_an_architecture", False, False),
    ],
)
def test_capabilities_come_from_mlx_lm_classes(arch, tensor, pipeline):
    assert supports(arch) == (tensor, pipeline)


def test_bad_dirs_are_refused_naming_what_is_wrong(tmp_path):
    with pytest.raises(MlxModelError, match="config.json is missing"):
        check_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    with pytest.raises(UnsupportedModelError, match="'no_such_arch'.*not an architecture"):
        check_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MlxModelError, match="no .safetensors weights"):
        check_dir(tmp_path)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(MlxModelError, match="lacks model-00002-of-00002.safetensors"):
        check_dir(tmp_path)


@pytest.mark.parametrize(
    ("setting", "system", "machine", "installed", "engine"),
    [
        ("auto", "Darwin", "arm64", True, "mlx"),
        ("auto", "Darwin", "arm64", False, "torch"),
        ("auto", "Darwin", "x86_64", True, "torch"),  # Intel Macs have no Metal for mlx
        ("auto", "Linux", "x86_64", True, "torch"),
        ("torch", "Darwin", "arm64", True, "torch"),
        ("mlx", "Linux", "x86_64", True, "mlx"),  # mlx[cpu]: slow, correct
    ],
)
def test_engine_choice(setting, system, machine, installed, engine):
    assert pick_engine(setting, system, machine, installed) == engine


@pytest.mark.parametrize(
    ("setting", "installed", "message"),
    [("mlx", False, "pip install 'shoal\\[mlx\\]'"), ("jax", True, "use auto, torch or mlx")],
)
def test_engine_choice_refusals_say_what_to_do(setting, installed, message):
    with pytest.raises(ValueError, match=message):
        pick_engine(setting, "Linux", "x86_64", installed)


# ---- the bundled SmolLM2 on the MLX engine ----------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smollm2_mlx(cache) -> Path:
    return convert_gguf(bundled_gguf(), cache)


def test_the_converted_gguf_is_a_complete_mlx_dir_that_answers_paris(smollm2_mlx, cache):
    from shoal.engine.generator import Generator
    from shoal.engine.serving import ServedModel
    from shoal.engine.tokenizer import Tokenizer

    assert (smollm2_mlx / DONE).is_file() and (smollm2_mlx / "tokenizer.json").is_file()
    assert convert_gguf(bundled_gguf(), cache) == smollm2_mlx  # converted once
    gguf_tokenizer = Tokenizer.from_gguf(bundled_gguf(), cache / "tokenizers")
    tokenizer = Tokenizer.from_hf_dir(smollm2_mlx)
    text = "The capital of France is Paris. <|im_end|>"
    assert tokenizer.encode(text) == gguf_tokenizer.encode(text)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    model, config = load(smollm2_mlx)
    generator = Generator(MlxExecutor(model, config, 2, 1024), tokenizer)
    generator.start()
    try:
        served = ServedModel("smollm2", tokenizer, generator)
        prompt = served.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
        params = SamplingParams(max_tokens=24, temperature=0)
        answer = "".join(e.text for e in served.generate_blocking(prompt, params))
    finally:
        generator.stop()
    assert "Paris" in answer


def test_a_node_with_engine_mlx_serves_the_bundled_model_to_the_openai_client(
    smollm2_mlx, cache, tmp_path
):
    from shoal.node import Node

    paths = Paths(data=tmp_path / "data", cache=cache, config=tmp_path / "config")
    settings = RunSettings(
        host="127.0.0.1",
        api_port=0,
        engine="mlx",
        max_seq_len=1024,
        log_level="warning",
        discovery_interfaces="none",
        paths=paths,
    )
    node = Node(settings)
    assert node.solo and all(i.engine == "mlx" for i in node.solo.values())
    sock = node.bind()
    node.start_runners()
    thread = threading.Thread(target=asyncio.run, args=(node.serve(sock),), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 180
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline and thread.is_alive(), node.not_ready_reason
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        (model,) = [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=24,
        )
        assert "Paris" in reply.choices[0].message.content
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Count from one to ten."}],
            stream=True,
            max_tokens=40,
            temperature=0.7,
            seed=1,
            stop=["five"],
            extra_body={"top_k": 20, "min_p": 0.05},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text and "five" not in text
    finally:
        node.stop()
        thread.join(timeout=30)
        node.close()
        sock.close()


def test_engine_mlx_where_mlx_is_missing_is_a_startup_error(monkeypatch):
    import shoal.node as node_module

    monkeypatch.setattr(node_module, "mlx_installed", lambda: False)
    with pytest.raises(StartupError, match="pip install 'shoal\\[mlx\\]'"):
        node_module._pick_engine("mlx")


def test_an_mlx_layout_that_cannot_run_is_refused_before_any_weights_are_read(smollm2_mlx):
    from shoal.runner.build import open_rank
    from shoal.runner.spec import RunnerSpec

    spec = RunnerSpec(
        instance_id="i",
        model_id="m",
        model_path=str(smollm2_mlx),
        engine="mlx",
        rank=0,
        world_size=2,
        layer_range=(0, 15),
        store_host="127.0.0.1",
        store_port=1,
    )
    with pytest.raises(ValueError, match="runs over ring or jaccl, not gloo"):
        open_rank(spec)
    ring = spec.model_copy(update={"backend": "ring"})
    assert open_rank(ring).config.arch == "llama"  # a pipeline of shoal's stages
    tensor = ring.model_copy(update={"sharding": "tensor", "layer_range": (0, 30)})
    with pytest.raises(ValueError, match="9 heads|heads"):
        open_rank(tensor)  # 9 heads do not split in two
    one = spec.model_copy(update={"world_size": 1, "layer_range": (0, 30)})
    assert open_rank(one).config.num_layers == 30


@pytest.mark.parametrize(
    ("arch", "bits", "backends", "layouts"),
    [
        ("qwen3_moe", 4, ("ring",), ("pipeline", "tensor")),  # mlx packing: mlx-lm only
        ("qwen3_moe", None, ("gloo", "ring"), ("pipeline", "tensor")),  # MoE: both engines
        ("llama", 4, ("ring",), ("pipeline", "tensor")),  # packed by mlx-lm's quantizer
        ("llama", None, ("gloo", "ring"), ("pipeline", "tensor")),  # plain: both engines
    ],
)
def test_a_node_holds_mlx_dirs_with_the_backends_and_bytes_they_load_with(
    arch, bits, backends, layouts, tmp_path
):
    from shoal.models.local import describe

    directory = tiny_mlx_dir(tmp_path / arch, arch, bits)
    held = describe("m", directory, backends=("gloo", "ring")).held
    assert (held.arch, held.backends, held.mlx_layouts) == (arch, backends, layouts)
    files = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    assert 0.9 * files < held.mlx_weight_bytes <= files  # the tensor bytes, quantized or not
