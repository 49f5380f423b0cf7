"""Typed documents at the bottom: everything that crosses a process or a wire.

Pydantic models (and the frozen dataclasses the pure core passes around), importing nothing
from the rest of shoal, so every other package can depend on them and they on nothing.
"""
