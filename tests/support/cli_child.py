"""The child side of `tests.support.processes.start_cli`: `python -m cli` without the start-up.

A test run starts about 160 CLI processes, and each spent 0.5-0.7 s of CPU importing the
CLI, the api or the worker before doing anything: a quarter of the parallel pass's CPU. So
the tests fork them from a server (multiprocessing's forkserver) that has imported this
module, and with it everything the commands import, once. The child then becomes what
`python -m cli <args>` would be: a process of its own, with its own session, environment,
working directory, standard streams, exit code and signal handlers.

What it cannot be is a process whose imports saw its own environment: so our modules read
the environment only when a command runs (settings, Rich's consoles), never at import.

This module is imported by the server, so it imports the CLI and what its commands import,
and nothing of the tests.
"""

import atexit
import os
import sys
from multiprocessing.connection import Connection

import uvicorn  # noqa: F401  (imported by the api command when it runs)

import api.app
import api.http_server  # noqa: F401  (likewise)
import worker.worker  # noqa: F401  (imported by the worker command when it runs)
from cli.main import app

# How click names the program when it runs as `python -m cli`, in usage lines and errors.
PROG_NAME = "python -m cli"


def become_cli(
    args: list[str],
    env: dict[str, str],
    cwd: str,
    stdin: Connection | None,
    stdout: Connection,
    stderr: Connection | None,
) -> None:
    """Run `python -m cli args` in this (forked) process; stderr None: into stdout.

    The pipes come as multiprocessing Connections, the one kind of file descriptor the
    fork server hands to its children; they carry raw bytes here, not messages.
    """
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin.fileno() if stdin is not None else devnull, 0)
    os.dup2(stdout.fileno(), 1)
    os.dup2((stderr or stdout).fileno(), 2)
    for end in (stdin, stdout, stderr):
        if end is not None:
            end.close()
    os.close(devnull)
    # As the interpreter opens them for pipes: stdout block-buffered, stderr line-buffered.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.argv = [PROG_NAME, *args]
    try:
        app(args=args, prog_name=PROG_NAME)
    finally:
        # multiprocessing ends its children with os._exit; an interpreter's exit runs these.
        atexit._run_exitfuncs()
