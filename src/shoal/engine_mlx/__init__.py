"""The MLX engine: models mlx-lm loads (MLX-format dirs, quantized weights kept quantized, and
HF safetensors dirs), driven by shoal's scheduler through the same Executor contract as the
torch engine (engine.generator). A sibling of `engine/`; imports nothing from api, cluster,
control or worker. Needs the `mlx` extra (`mlx[cpu]` on Linux, `mlx` with Metal on a Mac).
"""
