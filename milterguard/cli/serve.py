"""Run the milter daemon in the foreground (systemd runs it so).

The socket is `inet:PORT@HOST`, `inet6:PORT@HOST` or `unix:PATH`.  Log lines
go to stderr (the journal under systemd) or to syslog; one line per message
starts with `verdict` and carries a JSON object.
"""

from __future__ import annotations

import os
import sys

from milterguard.cli.common import CliError, load, load_engine, report


def add_arguments(parser) -> None:
    parser.add_argument("--socket", help="listen here (overrides milter.socket)")
    parser.add_argument("--workers", type=int, help="worker processes (overrides milter.workers; 0 = one per core)")
    parser.add_argument("--pid-file", help="write the supervisor's process id here")


def run(args) -> int:
    extra = []
    if args.socket:
        extra.append(f"milter.socket={args.socket}")
    if args.workers is not None:
        extra.append(f"milter.workers={args.workers}")
    try:
        config = load(args, extra)
        engine = load_engine(args, config)
    except CliError as exc:
        return report(exc)
    from milterguard.server import Supervisor, setup_logging

    setup_logging(config)

    def reload_engine():
        # A reload reads every file again; a broken file raises, and the old engine stays.
        return load_engine(args, load(args, extra))

    if args.pid_file:
        with open(args.pid_file, "w", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")
    supervisor = Supervisor(engine, reload_engine, config["milter.socket"], config.workers)
    try:
        return supervisor.run()
    finally:
        sys.stderr.flush()
