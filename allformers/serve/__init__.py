"""`allformers serve`: an OpenAI-compatible server with continuous batching (engine.py), its
FastAPI app (app.py) and a browser playground (playground.html)."""
