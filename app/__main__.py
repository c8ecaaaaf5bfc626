"""`python -m app [--host H] [--port P]`: run the chat service and print its URL."""

from __future__ import annotations

import argparse

from app.cli import add_serve_arguments, serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description="Run the reformer-chat service.")
    add_serve_arguments(parser)
    serve(parser.parse_args())


if __name__ == "__main__":
    main()
