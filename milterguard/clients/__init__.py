"""Network clients: the DNS layer (`dns_client`), Redis with replicas and
Sentinel (`redis_client`) and clamd (`clamd_client`).

Each one bounds its time, reports an outage once and raises its own
exception, which the checks turn into a `*_TEMPFAIL` symbol.
"""
