"""The runner: one process per (instance, rank) that drives an engine.

spec.py is the worker<->runner contract (RunnerSpec in, StatusLine out); build.py builds a rank
from the torch engine; process.py is the process; endpoint.py is rank 0's generation endpoint.
A second engine plugs in here, behind the same contract, without touching the API.
"""
