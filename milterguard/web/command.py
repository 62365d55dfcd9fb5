"""Run the web console (docs/web.md).

    milterguard web [--listen HOST:PORT]

Serves the console on `web.listen` (default 127.0.0.1:11380) with uvicorn,
reading the same configuration layers as the filter.  Put it behind the
site's TLS reverse proxy; add users with `milterguard user add`.
"""

from __future__ import annotations

import logging

from milterguard.cli.common import CliError, load, report
from milterguard.cli.quarantine import parse_hostport


def add_arguments(parser) -> None:
    parser.add_argument("--listen", default=None, metavar="HOST:PORT", help="instead of web.listen")


def run(args) -> int:
    try:
        config = load(args)
        listen = args.listen or config["web.listen"]
        try:
            host, port = parse_hostport(listen)
        except CliError:
            raise CliError(f"web.listen {listen!r}: expected HOST:PORT") from None
        from milterguard.web.app import ConsoleError, create_app

        try:
            app = create_app(config, args)
        except ConsoleError as exc:
            raise CliError(f"web: {exc}") from None
    except CliError as exc:
        return report(exc)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("milterguard").info("web console on http://%s:%d/", host, port)
    uvicorn.run(app, host=host, port=port, proxy_headers=True,
                forwarded_allow_ips=",".join(config["web.trusted_proxies"]),
                server_header=False, log_level="info")
    return 0
