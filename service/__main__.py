"""``python -m service [--host H] [--port P]``: serve the API with uvicorn, settings from ``QWENVL_*``."""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from service.main import create_app
    from service.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(Settings()), host=args.host, port=args.port, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
