"""The built-in simulator of the prediction API: a real aiohttp server for the demo, tests and dry runs."""

from batch_engine.sim.config import SimConfig, SimStats
from batch_engine.sim.server import Simulator, serve

__all__ = ["SimConfig", "SimStats", "Simulator", "serve"]
