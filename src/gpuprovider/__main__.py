"""`python -m gpuprovider`: the CLI (the daemon starts the gateway this way)."""

from gpuprovider.cli.main import run

run()
