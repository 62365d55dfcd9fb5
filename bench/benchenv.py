"""What the benchmark scripts share: the envelope they give each message, as `milterguard
bench` does, and the options of those that measure other source trees beside this one.

It lives here, not in the package, because the scripts that take --checkout drive
other source trees with it, trees that need not have any given name of this one.
"""

import argparse
import os


class BenchEnv:
    ip = "198.51.100.20"
    client_name = "mail.example.net"
    helo = "mail.example.net"
    mail_from = None
    rcpt = ["user@example.org"]
    auth = ""


def checkout_arguments(parser: argparse.ArgumentParser, corpus_help: str) -> None:
    """The options of a script that measures this tree and, with --checkout, others in one
    interleaved run, its worker processes included."""
    parser.add_argument("--corpus", default=os.environ.get("MILTERGUARD_CORPUS", "/work/shared/corpus"),
                        help=corpus_help)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the messages (default 3)")
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=DIR",
                        help="another source tree to measure alongside this one")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="sets", action="append", default=[], help=argparse.SUPPRESS)
