"""Building one rank: its rendezvous, its part of the model, and the executor that drives it.

`open_rank` picks the engine the spec names; both answer the same questions (the serving
config before any weights are read, the model, rank 0's executor, a follower), so the runner
process drives either the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from shoal.engine.config import ModelConfig
from shoal.engine.distributed import Peers, Rendezvous
from shoal.engine.generator import Executor, LocalExecutor, context_length
from shoal.engine.lockstep import Follower, PipelineExecutor, TensorExecutor
from shoal.engine.model import Transformer
from shoal.engine.sharding import load_tensor_shard, tensor_parallel_config
from shoal.engine.tokenizer import default_cache_dir
from shoal.engine.weights import WeightSource, load_model, open_source, release_freed_memory
from shoal.runner.spec import RunnerSpec
from shoal.schema.report import MLX_BACKENDS


def rendezvous_of(spec: RunnerSpec) -> Rendezvous:
    return Rendezvous(
        rank=spec.rank,
        world_size=spec.world_size,
        store_host=spec.store_host,
        store_port=spec.store_port,
        # an MLX instance's step headers go over gloo; its model's collectives over ring/jaccl
        backend="nccl" if spec.backend == "nccl" else "gloo",
        ifname=spec.ifname,
        attempts=spec.init_attempts,
        window_s=spec.init_window_s,
        step_timeout_s=spec.step_timeout_s,
    )


def check_spec(spec: RunnerSpec, config: ModelConfig) -> None:
    """Refuse a spec this rank cannot take part in, before any weights are read."""
    start, end = spec.layer_range
    last = spec.rank == spec.world_size - 1
    if not 0 <= spec.rank < spec.world_size:
        raise ValueError(f"rank {spec.rank} is outside world size {spec.world_size}")
    if spec.heartbeat_s >= spec.step_timeout_s:
        raise ValueError("heartbeat_s must be shorter than step_timeout_s")
    if spec.sharding == "tensor":
        if (start, end) != (0, config.num_layers):
            raise ValueError(
                f"tensor parallel ranks hold every layer: layer_range must be "
                f"(0, {config.num_layers}), not {spec.layer_range}"
            )
        tensor_parallel_config(config, spec.world_size)  # raises ShardingError
        return
    if spec.world_size > 1 and (
        (spec.rank == 0) != (start == 0) or last != (end == config.num_layers)
    ):
        raise ValueError(
            f"pipeline rank {spec.rank} of {spec.world_size} holds stage {spec.rank}: layers "
            f"{spec.layer_range} do not fit (the model has {config.num_layers} layers; rank 0 "
            "starts at layer 0 and the last rank ends with the last layer)"
        )


def load_rank_model(spec: RunnerSpec, source: WeightSource) -> Transformer:
    """This rank's part of the model, and nothing more: its layers or its slices."""
    check_spec(spec, source.config)
    if spec.sharding == "tensor":
        return load_tensor_shard(
            spec.model_path,
            spec.rank,
            spec.world_size,
            spec.device,
            source=source,
            quantize=spec.quantize,
        )
    return load_model(
        spec.model_path, tuple(spec.layer_range), spec.device, source=source, quantize=spec.quantize
    )


def build_executor(
    spec: RunnerSpec, peers: Peers, model: Transformer, config: ModelConfig
) -> Executor:
    """Rank 0's executor, for the scheduler."""
    max_seq_len = context_length(config, spec.max_seq_len)
    if spec.world_size == 1:
        return LocalExecutor(model, spec.max_batch, max_seq_len)
    kind = TensorExecutor if spec.sharding == "tensor" else PipelineExecutor
    return kind(
        model,
        peers,
        config,
        max_batch=spec.max_batch,
        max_seq_len=max_seq_len,
        heartbeat_s=spec.heartbeat_s,
    )


def build_follower(
    spec: RunnerSpec, peers: Peers, model: Transformer, config: ModelConfig
) -> Follower:
    return Follower(
        model,
        peers,
        config,
        spec.sharding,
        max_batch=spec.max_batch,
        max_seq_len=context_length(config, spec.max_seq_len),
        stop_grace_s=spec.heartbeat_s + 1.0,
    )


Progress = Callable[[int, int], None]


class Following(Protocol):
    """A follower rank's loop (engine.lockstep.Follower, engine_mlx.lockstep.MlxFollower)."""

    def request_stop(self) -> None: ...

    def run(self, on_step: Callable[[], None] | None = None) -> None: ...


class Rank(Protocol):
    config: ModelConfig  # known before any weights are read

    def load(self, peers: Peers | None, progress: Progress | None = None) -> Any:
        """This rank's part of the model; progress(layers loaded, of) where the engine can."""

    def executor(self, peers: Peers | None, model: Any) -> Executor: ...

    def follower(self, peers: Peers, model: Any) -> Following: ...


class TorchRank:
    """This rank on shoal's own engine (GGUF or safetensors, pipeline or tensor parallel)."""

    def __init__(self, spec: RunnerSpec) -> None:
        self.spec = spec
        self.source: WeightSource | None = open_source(spec.model_path)  # metadata: check early
        check_spec(spec, self.source.config)
        self.config = self.source.config

    def load(self, peers: Peers | None, progress: Progress | None = None) -> Transformer:
        assert self.source is not None, "a rank loads once"
        model = load_rank_model(self.spec, self.source)
        # the source maps the whole file: pages the load touched would stay resident with it
        self.source = None
        release_freed_memory()
        return model

    def executor(self, peers: Peers | None, model: Transformer) -> Executor:
        return build_executor(self.spec, peers, model, self.config)  # type: ignore[arg-type]

    def follower(self, peers: Peers, model: Transformer) -> Follower:
        return build_follower(self.spec, peers, model, self.config)


class MlxRank:
    """This rank on mlx-lm (shoal.engine_mlx): an MLX or HF dir, or a GGUF file converted once
    into an MLX dir in the cache. Across nodes its model's collectives run over mx.distributed
    (ring or jaccl) and its steps in lockstep with rank 0 (engine_mlx.lockstep)."""

    def __init__(self, spec: RunnerSpec) -> None:
        from shoal.engine_mlx import load as mlx_load

        if spec.world_size > 1 and spec.backend not in MLX_BACKENDS:
            raise ValueError(
                f"an MLX instance across nodes runs over ring or jaccl, not {spec.backend}"
            )
        self.spec = spec
        self.path = Path(spec.model_path)
        self.gguf = self.path.is_file()  # converted into an MLX dir at load
        self.config = (
            open_source(self.path).config if self.gguf
            else mlx_load.serving_config(mlx_load.check_dir(self.path))
        )  # fmt: skip
        check_spec(spec, self.config)
        if spec.world_size > 1:
            mlx_load.check_sharding(self.config.arch, spec.sharding)

    def load(self, peers: Peers | None, progress: Progress | None = None) -> Any:
        from shoal.engine_mlx import load as mlx_load
        from shoal.engine_mlx.convert import convert_gguf
        from shoal.engine_mlx.group import join_group

        spec, path = self.spec, self.path
        if self.gguf:
            cache = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir().parent
            path = convert_gguf(path, cache)
        group = None
        if peers is not None:
            hosts = spec.rank_hosts or (spec.store_host,) * spec.world_size
            group = join_group(peers, spec.backend, hosts, spec.rdma_devices, ifname=spec.ifname)
        model, _ = mlx_load.load(path, group, spec.sharding, tuple(spec.layer_range), progress)
        return model

    def _local(self, model: Any, sample: bool) -> Any:
        from shoal.engine_mlx.executor import MlxExecutor

        max_seq_len = context_length(self.config, self.spec.max_seq_len)
        return MlxExecutor(model, self.config, self.spec.max_batch, max_seq_len, sample=sample)

    def executor(self, peers: Peers | None, model: Any) -> Executor:
        from shoal.engine_mlx.lockstep import MlxLockstep

        local = self._local(model, sample=True)
        return local if peers is None else MlxLockstep(local, peers, self.spec.heartbeat_s)

    def follower(self, peers: Peers, model: Any) -> Following:
        from shoal.engine_mlx.lockstep import MlxFollower, drop_head

        drop_head(model)
        return MlxFollower(self._local(model, sample=False), peers, self.spec.heartbeat_s + 1.0)


def open_rank(spec: RunnerSpec) -> Rank:
    """This rank's engine, with the model's serving config read and the spec checked."""
    return MlxRank(spec) if spec.engine == "mlx" else TorchRank(spec)
