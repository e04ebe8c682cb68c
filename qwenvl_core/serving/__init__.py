"""Multi-adapter serving: grouped LoRA batching, the adapter cache, the batching engine, the chat API schemas.

Nothing here imports Ray, FastAPI or the service; ``workflows/serve_app.py`` and ``service/routes/chat.py``
wrap it. Submodules are imported explicitly (no work at import time).
"""
