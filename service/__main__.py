"""``python -m service [--host H] [--port P]``: serve the API with uvicorn, settings from ``QWENVL_*``
(at most ``max_ongoing_requests`` connections and requests at once)."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def serve(app: Any, max_ongoing_requests: int, host: str, port: int, **options: Any) -> None:
    """Run ``app`` under uvicorn: 503 above ``max_ongoing_requests`` connections + requests (uvicorn's
    ``limit_concurrency``), idle keep-alive connections closed after 5 s. Slow bodies and the tenants' limits are
    the app's (``service.admission``)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=10, limit_concurrency=max_ongoing_requests,
                timeout_keep_alive=5, **options)


def main(argv: list[str] | None = None) -> None:
    from service.main import create_app
    from service.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    serve(create_app(settings), settings.max_ongoing_requests, args.host, args.port)


if __name__ == "__main__":
    main()
