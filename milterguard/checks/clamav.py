"""Virus scanning through clamd (INSTREAM over TCP or a unix socket).

The message as received (or each decoded attachment, by `clamav.scan`) is
streamed to clamd (milterguard/clients/clamd_client.py).  A signature found gives
CLAMAV_VIRUS with the signature name as its option; CLAMAV_VIRUS has a
fixed action in rules/clamav.yaml (reject unless overridden).  clamd down,
slow or answering an error gives CLAMAV_TEMPFAIL and the message goes on
(fail-open): the socket timeout is bounded by what is left of the
message's time budget.
"""

from __future__ import annotations

import io
import logging
import time

from milterguard.checks.registry import check
from milterguard.clients.clamd_client import Clamd, ClamdError, ClamdTooLarge
from milterguard.clients.outage import Outage
from milterguard.mail.raw import MessageStream
from milterguard.model import Hits, Stage

# clamd's health per address, in this process.
_OUTAGES: dict[str, Outage] = {}

log = logging.getLogger("milterguard.clamav")

MAX_ATTACHMENTS = 20  # parts streamed one by one when clamav.scan is "attachments"
_announced: set[str] = set()


@check(stage=Stage.EOM, emits=("CLAMAV_VIRUS", "CLAMAV_TEMPFAIL", "CLAMAV_TOO_LARGE"), priority=70,
       active=lambda config: bool(config["clamav.address"]))
def clamav(scan, hits: Hits) -> None:
    """Stream the message (or its attachments) to clamd and report the signature found."""
    config = scan.config
    address = config["clamav.address"]
    if not address:
        if "" not in _announced:
            _announced.add("")
            log.info("virus scanning is off: clamav.address is empty")
        return
    txn = scan.txn
    ref = txn.queue_id or scan.conn.ident
    left = config["checks.message_budget"] - (time.monotonic() - txn.started)
    timeout = max(0.05, min(config["clamav.timeout"], left))
    limit = config["clamav.max_size"]
    client = Clamd(address, timeout)
    if config["clamav.scan"] == "message":
        stream = MessageStream(txn.headers, txn.body, limit)
        size = stream.size
        if size > limit:
            hits.add("CLAMAV_TOO_LARGE", f"{size} bytes", where="clamd", text=f"{size} > clamav.max_size {limit}")
            return
        streams = [("message", stream)]
    else:
        streams = []
        for part in scan.message.attachments[:MAX_ATTACHMENTS]:
            if part.size > limit:
                hits.add("CLAMAV_TOO_LARGE", f"{part.size} bytes", where="clamd", text=part.filename or part.content_type)
                continue
            streams.append((part.filename or part.content_type, io.BytesIO(part.payload)))
    outage = _OUTAGES.get(address) or _OUTAGES.setdefault(address, Outage(f"clamd at {address}", log))
    if streams and not outage.usable():
        # Known to be away: not asked again until its retry time, so a frozen clamd costs no wait.
        hits.add("CLAMAV_TEMPFAIL", "unavailable", where="clamd", text=f"clamd at {address} is away, retrying soon")
        return
    t0 = time.monotonic()
    for what, stream in streams:
        try:
            result = client.instream(stream)
        except ClamdTooLarge:
            hits.add("CLAMAV_TOO_LARGE", what, where="clamd", text="clamd: INSTREAM size limit exceeded")
            continue
        except ClamdError as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) or "timed out" in str(exc) else "unavailable"
            # One line per outage (Outage), not one per message; the verdict names the symbol.
            outage.failed(f"{reason} after {time.monotonic() - t0:.2f}s: {exc}")
            log.debug("clamd %s for %s: %s", reason, ref, exc)
            hits.add("CLAMAV_TEMPFAIL", reason, where="clamd", text=str(exc)[:160])
            return
        outage.succeeded()
        status, name = result.status, result.detail
        if status == "FOUND":
            log.info("clamd found %s in %s of %s", name, what, ref)
            hits.add("CLAMAV_VIRUS", name, where="clamd", text=f"{name} in {what}")
        elif status != "OK":
            log.warning("clamd answered an error for %s: %s", ref, name)
            hits.add("CLAMAV_TEMPFAIL", "error", where="clamd", text=str(name)[:160])
            return
