"""shoal: pool the machines on a network into one LLM server."""

__version__ = "0.1.0"
