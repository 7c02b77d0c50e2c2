"""Engines drive rounds: the embedded in-process simulation, and Flower (:mod:`hlora.engine.flower`)."""

from hlora.engine.simulation import Reporter, RunResult, resume, run

__all__ = ["Reporter", "RunResult", "resume", "run"]
