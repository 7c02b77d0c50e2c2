"""Engines drive rounds: the embedded in-process simulation (and, later, Flower)."""

from hlora.engine.simulation import Reporter, RunResult, resume, run

__all__ = ["Reporter", "RunResult", "resume", "run"]
