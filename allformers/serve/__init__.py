"""`allformers serve`: an OpenAI-compatible server with continuous batching (engine.py), its
FastAPI app (app.py) and a browser playground (playground.html)."""
from .app import Served, create_app
from .engine import Engine, QueueFullError, SamplingParams

__all__ = ["Engine", "Served", "create_app", "SamplingParams", "QueueFullError"]
