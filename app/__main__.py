"""`python -m app [--host H] [--port P]`: the same as `reformer-chat serve` (app/cli.py)."""

import sys

from app.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
