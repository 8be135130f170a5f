"""Serve a comparison app through the `score-ingest api` command itself.

`python -m bench.serve bare|naive [--host H] [--port P]` runs exactly what `score-ingest api`
runs (logging set-up, `uvicorn.run` and every argument it passes) with only the app factory
swapped, so the comparison apps can never drift from our server settings.
"""

import sys

import api.app
import cli.main
from bench import bare_app, naive_app

_FACTORIES = {"bare": bare_app.create_app, "naive": naive_app.create_app}


def main() -> None:
    """Run `score-ingest api` with the named comparison app."""
    if len(sys.argv) < 2 or sys.argv[1] not in _FACTORIES:
        sys.exit(f"usage: python -m bench.serve {{{'|'.join(_FACTORIES)}}} [api options]")
    # The api command imports create_app from api.app when it runs: rebinding it there is
    # the one change.
    api.app.create_app = _FACTORIES[sys.argv[1]]
    cli.main.app(["api", *sys.argv[2:]])


if __name__ == "__main__":
    main()
