"""Run the milter daemon in the foreground (systemd runs it so).

The socket is `inet:PORT@HOST`, `inet6:PORT@HOST` or `unix:PATH`.  Log lines
go to stderr (the journal under systemd) or to syslog; one line per message
starts with `verdict` and carries a JSON object.
"""

from __future__ import annotations

import logging
import os
import sys

from milterguard.cli.common import CliError, load, load_engine

log = logging.getLogger("milterguard")


def add_arguments(parser) -> None:
    parser.add_argument("--socket", help="listen here (overrides milter.socket)")
    parser.add_argument("--workers", type=int, help="worker processes (overrides milter.workers; 0 = one per core)")
    parser.add_argument("--pid-file", help="write the supervisor's process id here")


def run(args) -> int:
    from milterguard.server import Supervisor, setup_logging

    # Logging first: the configuration and the engine log as they load (Redis down at
    # start, say), and every line of a start must carry its time and level.
    setup_logging()
    extra = []
    if args.socket:
        extra.append(f"milter.socket={args.socket}")
    if args.workers is not None:
        extra.append(f"milter.workers={args.workers}")
    try:
        config = load(args, extra)
        setup_logging(config)
        engine = load_engine(args, config)
    except CliError as exc:
        log.error("%s", exc)
        return exc.status
    if config["dns.enabled"]:
        # Imported once here, before the workers fork, rather than by each worker
        # at its first DMARC record (the check imports it late for the other commands).
        import checkdmarc.dmarc  # noqa: F401

    for line in feature_summary(config):
        log.info("%s", line)

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


def feature_summary(config) -> list[str]:
    """One log line per feature that depends on something outside the filter.

    The default configuration needs nothing else running: what needs DNS, Redis
    or clamd says here whether it is on, and why not.
    """
    lines = []
    if config["dns.enabled"]:
        servers = ", ".join(config["dns.nameservers"]) or "the system's resolver"
        public = "public blocklists on" if config["rbl.public"] else "public blocklists off (rbl.public)"
        lines.append(f"DNS checks (SPF, DKIM, DMARC, ARC, blocklists) on, asking {servers}; {public}")
    else:
        lines.append("DNS checks (SPF, DKIM, DMARC, ARC, blocklists) off: dns.enabled is false")
    if config["redis.url"] or config["redis.sentinels"]:
        where = config["redis.url"] or f"Sentinel service {config['redis.sentinel_service']}"
        parts = [name for name, key in (("Bayes", "bayes.enabled"), ("classifier", "ml.enabled"),
                                         ("content hashes", "fuzzy.enabled")) if config[key]]
        if config["lists.backend"] == "redis":
            parts.append("allow and block lists")
        lines.append(f"Redis at {where} for {', '.join(parts) or 'nothing (all Redis features disabled)'}")
    else:
        lines.append("Bayes, classifier and content hashes off: no Redis configured (redis.url)")
    if config["clamav.address"]:
        lines.append(f"ClamAV at {config['clamav.address']}; CLAMAV_TEMPFAIL while it cannot be reached")
    else:
        lines.append("ClamAV off: no clamd configured (clamav.address)")
    return lines
