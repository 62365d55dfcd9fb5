"""Every configuration setting, typed and documented where it is declared.

The configuration reference (docs/configuration.md) is generated from this
module by `milterguard config doc`; a test keeps the page up to date.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from milterguard.settingtypes import (  # noqa: F401 - the types are part of this module's interface
    Type,
    Str,
    ClamdAddress,
    ListenAddress,
    FileMode,
    Directory,
    Int,
    Float,
    Seconds,
    Size,
    Bool,
    Choice,
    ListOf,
    Struct,
    MapOf,
)


# ---------------------------------------------------------------- declarations


@dataclass
class Setting:
    key: str
    type: Type
    default: Any
    doc: str
    since: str = "0.1"
    merge: bool = False  # True for mappings that local.d deep-merges key by key
    default_doc: str = ""  # how the default is shown when it is computed


ACTION_NAMES = ("accept", "tag", "review", "discard", "tempfail", "reject")
_SYMBOL_RE = r"[A-Z][A-Z0-9_]*"
_DOMAIN_RE = r"[A-Za-z0-9*][A-Za-z0-9.-]*"

# The common public blocklists. Spamhaus ZEN and DBL are free for small sites (non-commercial use,
# under 100,000 SMTP connections and 300,000 queries a day, through a resolver of one's own) and are
# on unless rbl.free_lists is false (`free`); SURBL and URIBL are off until rbl.public is true.
# Spamhaus answers 127.255.255.252 (a malformed query), .254 (a public or open resolver) and .255
# (over the free volume); the DBL answers 127.0.1.255 to an IP address asked as a domain: none of
# those is a listing (`blocked`).
SPAMHAUS_BLOCKED = ["127.255.255.0/24"]
RBL_PUBLIC_LISTS = {
    "spamhaus_zen": {"zone": "zen.spamhaus.org", "kind": "ip", "free": True, "blocked": SPAMHAUS_BLOCKED,
                     "symbol": "RBL_SPAMHAUS",
                     "codes": {"127.0.0.2": "RBL_SPAMHAUS_SBL", "127.0.0.3": "RBL_SPAMHAUS_CSS",
                               "127.0.0.4/30": "RBL_SPAMHAUS_XBL", "127.0.0.9": "RBL_SPAMHAUS_DROP",
                               "127.0.0.10/31": "RBL_SPAMHAUS_PBL"}},
    "spamhaus_dbl": {"zone": "dbl.spamhaus.org", "kind": "uri", "free": True,
                     "blocked": [*SPAMHAUS_BLOCKED, "127.0.1.255/32"], "symbol": "URIBL_SPAMHAUS_DBL",
                     "codes": {"127.0.1.4/30": "URIBL_SPAMHAUS_DBL_PHISH",
                               "127.0.1.102/31": "URIBL_SPAMHAUS_DBL_ABUSED"}},
    "spamhaus_dbl_from": {"zone": "dbl.spamhaus.org", "kind": "from", "free": True,
                          "blocked": [*SPAMHAUS_BLOCKED, "127.0.1.255/32"], "symbol": "RHSBL_SPAMHAUS_DBL_FROM"},
    "surbl": {"zone": "multi.surbl.org", "kind": "uri", "public": True, "bitmask": True,
              "blocked": ["127.0.0.1/32"],
              "codes": {"127.0.0.8": "URIBL_SURBL_PH", "127.0.0.16": "URIBL_SURBL_MW",
                        "127.0.0.64": "URIBL_SURBL_ABUSE", "127.0.0.128": "URIBL_SURBL_CR"}},
    "uribl": {"zone": "multi.uribl.com", "kind": "uri", "public": True, "bitmask": True,
              "blocked": ["127.0.0.1/32"],
              "codes": {"127.0.0.2": "URIBL_BLACK", "127.0.0.4": "URIBL_GREY", "127.0.0.8": "URIBL_RED"}},
}

THRESHOLDS = Struct("thresholds", reject=Float(), review=Float(), tag=Float())
QUARANTINE_MODE = Choice("store", "mta-hold")

SETTINGS: list[Setting] = [
    # --- this node (docs/cluster.md)
    Setting("node.name", Str(), "",
            "This filter node's name, in its verdict log lines and in the messages it stores in the quarantine; "
            "empty for the host name.", since="0.3"),
    # --- milter
    Setting("milter.socket", Str(), "inet:11339@127.0.0.1",
            "Where the milter listens: `inet:PORT@HOST`, `inet6:PORT@HOST` or `unix:PATH`."),
    Setting("milter.workers", Int(minimum=0, maximum=256), 0,
            "Worker processes sharing the listening socket; 0 means one per CPU core."),
    Setting("milter.name", Str(), "milterguard", "Filter name reported to the MTA."),
    Setting("milter.timeout", Seconds(), 600.0,
            "How long libmilter waits for the MTA before it drops a session."),
    Setting("milter.drain_timeout", Seconds(), 30.0,
            "On SIGTERM or reload, how long a worker waits for its open sessions to end."),
    Setting("milter.malloc_arenas", Int(minimum=0, maximum=64), 2,
            "Most malloc arenas (glibc's M_ARENA_MAX) in each process, set at start. libmilter runs "
            "each session in a thread of its own, and glibc gives threads up to eight arenas per "
            "core, each keeping the memory its largest messages needed: a worker grew to 16 "
            "arenas holding 136 MB for 38 MB in use. Python runs one thread at a time, so more "
            "arenas buy little speed. 0 leaves glibc's default.", since="0.3"),
    Setting("milter.unix_socket_mode", FileMode(), "0660",
            "Permissions of a unix socket (octal, quoted in YAML). The socket is made with "
            "them, whatever the umask; an invalid mode stops the start."),
    # --- logging
    Setting("log.target", Choice("stderr", "syslog"), "stderr",
            "Where log lines go. Under systemd, stderr ends up in the journal."),
    Setting("log.level", Choice("debug", "info", "warning", "error"), "info", "Least severe level logged."),
    Setting("log.verdict_max_bytes", Int(minimum=512), 2048,
            "Longest verdict line (bytes, without the log's own prefix). Classic syslog "
            "cuts lines at 1024 bytes, rsyslog at 8 KB by default. A longer verdict keeps the "
            "first recipients and symbols that fit and counts the others in rcpts_more and "
            "symbols_more.", since="0.2"),
    Setting("log.syslog_facility", Str(), "mail", "Syslog facility when log.target is syslog."),
    Setting("log.syslog_socket", Str(), "/dev/log", "Syslog socket path when log.target is syslog."),
    # --- metrics (docs/metrics.md)
    Setting("metrics.listen", ListenAddress(), "",
            "Where the filter serves Prometheus metrics at /metrics, as ADDRESS:PORT (an IPv6 address in "
            "brackets), such as 127.0.0.1:11381; empty for off. The supervisor serves them, adding up the "
            "figures of every worker. The page has no authentication: keep it on loopback or a private "
            "network.", since="0.4"),
    Setting("metrics.directory", Str(), "",
            "Directory where each worker writes its figures (prometheus_client's multiprocess files), "
            "emptied at each start and made mode 0700. Empty: a new directory under the system's temporary "
            "directory, removed at stop. A directory in memory (tmpfs, such as /run/milterguard/metrics) "
            "keeps the writes off the disk.", since="0.4"),
    Setting("metrics.quarantine_interval", Seconds(), 30.0,
            "How often the supervisor reads the quarantine's size for milterguard_quarantine_messages "
            "and milterguard_quarantine_size_bytes (one count query, in a thread of its own, never at "
            "a scrape); 0 for never.", since="0.4"),
    # --- scoring
    Setting("thresholds", THRESHOLDS, {"reject": 15.0, "review": 6.0, "tag": 4.0},
            "Scores at which a message is rejected, held for review, or tagged.", merge=True),
    Setting("domains", MapOf(Struct("domain policy", thresholds=THRESHOLDS, mode=Choice("enforce", "tag-only", "shadow"),
                                    quarantine=QUARANTINE_MODE), _DOMAIN_RE, "recipient domain"), {},
            "Per recipient domain overrides: `thresholds`, `mode` and `quarantine` (what review does, as "
            "`quarantine.mode`; `mta-hold` wins among the recipients of one message). When recipients of one message "
            "fall under different policies, the most lenient action among them is taken, so that no "
            "domain's mail is refused by another domain's policy.", merge=True),
    Setting("symbols", MapOf(Struct("symbol override", weight=Float(), enabled=Bool(), state=Choice("stable", "testing"),
                                    action=Choice(*ACTION_NAMES), group=Str(), description=Str()),
                             _SYMBOL_RE, "symbol"), {},
            "Per symbol overrides of what the rule files declare: weight, enabled, state, action, group.", merge=True),
    Setting("groups", MapOf(Struct("group", max_score=Float(), min_score=Float(), description=Str()),
                            r"[a-z][a-z0-9_]*", "group"), {},
            "Group caps: the positive weights of a group add up to at most `max_score`, the negative ones "
            "to at least `min_score`.", merge=True),
    # --- actions
    Setting("actions.mode", Choice("enforce", "tag-only", "shadow"), "enforce",
            "`enforce` applies verdicts; `tag-only` never rejects or holds, it only adds headers; "
            "`shadow` logs the verdict and changes nothing."),
    Setting("actions.early_reject", Bool(), True,
            "Apply a verdict decided before end of message (a blocked client, say) at the first RCPT."),
    Setting("actions.reject_code", Str(), "550", "SMTP code of a rejection."),
    Setting("actions.reject_status", Str(), "5.7.1", "Enhanced status code of a rejection."),
    Setting("actions.reject_text", Str(), "Message refused as spam (ref {ref})",
            "Text of a rejection; `{ref}` becomes the queue id, or a session reference."),
    Setting("actions.tempfail_text", Str(), "Try again later (ref {ref})", "Text of a temporary failure."),
    Setting("actions.subject_tag", Str(), "[SPAM]",
            "Prefix added to the Subject of tagged (and held) messages; empty for none."),
    Setting("actions.on_error.unauthenticated", Choice("accept", "tempfail"), "tempfail",
            "What happens to a message from an unauthenticated client when the filter itself fails."),
    Setting("actions.on_error.authenticated", Choice("accept", "tempfail"), "accept",
            "What happens to a message from an authenticated (SASL) client when the filter itself fails."),
    Setting("headers.enabled", Bool(), True, "Add X-Spam-* headers to delivered messages."),
    Setting("headers.symbols", Bool(), True, "Add the X-Spam-Symbols header."),
    Setting("headers.node", Bool(), True,
            "Add X-Spam-Node with the name of the node that judged the message (`node.name`), for sites "
            "with several filter nodes; false leaves the inner host name out of delivered mail.", since="0.3"),
    Setting("headers.remove_upstream", Bool(), True,
            "Remove X-Spam-* headers that arrive with the message: they are never trusted."),
    # --- quarantine (docs/quarantine.md)
    Setting("quarantine.mode", QUARANTINE_MODE, "store",
            "What review does: `store` keeps the message in the quarantine (`quarantine.url`) and the MTA "
            "never delivers it; `mta-hold` puts it in the MTA's hold queue.", since="0.3"),
    Setting("quarantine.url", Str(), "sqlite:////var/lib/milterguard/quarantine.db",
            "The quarantine store: `sqlite:///PATH` (a file of this node), or `postgresql://USER@HOST:PORT/DB` "
            "(shared by several nodes). A store that cannot take a message answers by `actions.on_error`.",
            since="0.3"),
    Setting("quarantine.reinject", Str(), "127.0.0.1:10026",
            "`HOST:PORT` of an SMTP service that bypasses the filter, where released messages go.", since="0.3"),
    Setting("quarantine.retention_days", Int(minimum=1), 30,
            "`milterguard quarantine expire` removes messages stored longer ago than this.", since="0.3"),
    Setting("quarantine.max_size", Size(), 10 * 1024**3,
            "Past this total size `quarantine expire` removes the oldest messages too; 0 for no cap.", since="0.3"),
    # --- history and web console (docs/web.md)
    Setting("history.enabled", Bool(), True,
            "Record one row per judged message (time, client, envelope, Subject, score, action, symbols; no body) "
            "in the quarantine's database (`quarantine.url`), for the web console. Written by a thread of each "
            "process; a database that is down drops rows (logged once) and never delays mail.", since="0.4"),
    Setting("history.retention_days", Int(minimum=1), 30,
            "`milterguard quarantine expire` removes history rows older than this.", since="0.4"),
    Setting("web.listen", Str(), "127.0.0.1:11380",
            "`HOST:PORT` where `milterguard web` serves the console; keep it on loopback behind a TLS "
            "reverse proxy.", since="0.4"),
    Setting("web.url", Str(), "",
            "The console's address as users reach it (`https://mail.example.org/console`), for the links "
            "`quarantine digest` mails; required by the digest.", since="0.4"),
    Setting("web.trusted_proxies", ListOf(Str()), ["127.0.0.1", "::1"],
            "Addresses whose X-Forwarded-Proto and X-Forwarded-For the console believes (the reverse proxy).",
            since="0.4"),
    Setting("web.secure_cookies", Choice("auto", "always", "never"), "auto",
            "Mark the session cookie Secure: `auto` when the request came over HTTPS (directly or as a trusted "
            "proxy says), `always`, or `never`.", since="0.4"),
    Setting("web.session_hours", Int(minimum=1, maximum=720), 8,
            "A console login lasts this long.", since="0.4"),
    Setting("web.login_failures", Int(minimum=1, maximum=1000), 5,
            "Failed logins of one name, or from one address, within 15 minutes, after which logins are refused "
            "for 15 minutes.", since="0.4"),
    Setting("web.digest_from", Str(), "postmaster",
            "The sender of `quarantine digest` mail; a name without `@` gets `@` and `node.name` (or the host "
            "name) added.", since="0.4"),
    Setting("web.digest_link_days", Int(minimum=1, maximum=90), 7,
            "How long the release and delete links of a quarantine digest work.", since="0.4"),
    # --- message
    Setting("message.spool_bytes", Size(), 1024 * 1024,
            "Bodies larger than this are spooled to a temporary file instead of memory."),
    Setting("message.spool_dir", Directory(), "", "Directory for spooled bodies, which must exist when the configuration is read; empty for the "
            "system default."),
    Setting("message.max_scan_bytes", Size(), 10 * 1024 * 1024,
            "Only this much of a message is parsed and scanned; a larger message gets SCAN_TRUNCATED "
            "and is otherwise treated as usual (never rejected for its size alone)."),
    Setting("message.max_text_chars", Int(minimum=1024), 512 * 1024,
            "Characters of decoded text that body rules look at."),
    # --- rules and checks
    Setting("rules.files", ListOf(Str()), ["{share}/rules/*.yaml", "{etc}/rules.d/*.yaml"],
            "Rule files (glob patterns). `{share}` is the package's data directory, `{etc}` the configuration directory."),
    Setting("rules.weights", ListOf(Str()), ["{share}/rules/weights/*.yaml", "{etc}/weights.d/*.yaml"],
            "Weight files (glob patterns): YAML mappings of symbols to weights, over the rule files' own and under "
            "`symbols:`. The shipped `rules/weights/learned.yaml` holds the weights fitted on the shared corpus "
            "(docs/accuracy.md); `rules.weights: []` goes back to the rule files' weights.", since="0.3"),
    Setting("rules.maps_dirs", ListOf(Str()), ["{etc}/maps", "{share}/rules/maps"],
            "Where relative map file names in rules are looked up, in order, before the rule file's own directory."),
    Setting("checks.disabled", ListOf(Str()), [], "Python checks (by name) that do not run."),
    Setting("checks.message_budget", Seconds(), 10.0,
            "Time budget for all checks of one message; checks not started by then are skipped "
            "with CHECK_BUDGET_EXCEEDED."),
    Setting("checks.check_budget", Seconds(), 2.0,
            "A check that runs longer than this is reported with CHECK_SLOW and logged. Time spent waiting "
            "for DNS answers does not count: `dns.message_budget` bounds it."),
    # --- DNS, sender authentication and blocklists
    Setting("dns.enabled", Bool(), True,
            "Make DNS lookups at all. `false` skips every check that needs them (SPF, DKIM, DMARC, ARC, "
            "blocklists), as for an offline scan of a corpus.", since="0.2"),
    Setting("dns.nameservers", ListOf(Str()), [],
            "Name servers to ask, as `ADDRESS` or `ADDRESS:PORT` (`[ADDRESS]:PORT` for IPv6); "
            "empty for the system's (/etc/resolv.conf).", since="0.2"),
    Setting("dns.timeout", Seconds(), 2.0,
            "Per-query limit; on expiry the check emits its *_TEMPFAIL symbol.", since="0.2"),
    Setting("dns.message_budget", Seconds(), 5.0,
            "DNS time of one message: the lookups of a message run concurrently and all waits for "
            "their answers together take at most this long; a check whose answer is not back by then "
            "emits its *_TEMPFAIL symbol and the message goes on.", since="0.2"),
    Setting("dns.cache_size", Int(minimum=0), 20000,
            "Answers (positive and negative) kept per process, each for its TTL; 0 turns the cache off.",
            since="0.2"),
    Setting("dns.workers", Int(minimum=1, maximum=256), 16,
            "Lookups in flight at once per process.", since="0.2"),
    Setting("auth.authserv_id", Str(), "",
            "authserv-id of the Authentication-Results header (RFC 8601); empty for the MTA's `j` macro, "
            "else this host's name.", since="0.2"),
    Setting("auth.results_header", Bool(), True,
            "Add an Authentication-Results header, after removing those that claim our authserv-id.",
            since="0.2"),
    Setting("auth.trusted_relays", ListOf(Str()), [],
            "Addresses or networks (CIDR) of our own relays and forwarders: for a client among them, SPF "
            "is judged on the address of the hop before them in the Received headers.", since="0.2"),
    Setting("auth.trusted_arc_sealers", ListOf(Str()), [],
            "Domains whose valid ARC seal vouches for the authentication results of a forwarded message: "
            "such a message that fails DMARC is not punished for it.", since="0.2"),
    Setting("auth.skip_authenticated", Bool(), True,
            "Skip SPF, DMARC and blocklists for clients that logged in (SASL) and for local clients (a unix "
            "socket or loopback address), and DKIM and ARC for the former.", since="0.2"),
    Setting("rbl.enabled", Bool(), True,
            "Query the DNS blocklists declared in `rbl.lists` (of the shipped ones, Spamhaus ZEN and DBL "
            "are on unless `rbl.free_lists` is false; SURBL and URIBL are off until `rbl.public` is true).",
            since="0.2"),
    Setting("rbl.free_lists", Bool(), True,
            "Query the shipped lists whose terms let small sites use them free (`free: true`: Spamhaus ZEN "
            "and DBL; free for non-commercial use under 100,000 SMTP connections and 300,000 queries a "
            "day). They refuse queries that come through public resolvers (8.8.8.8, 1.1.1.1, most "
            "providers' forwarders): use a recursive resolver of your own (`dns.nameservers`). `false` "
            "turns them off, as a site over those limits must. See docs/authentication.md.", since="0.3"),
    Setting("rbl.public", Bool(), False,
            "Turn on the shipped public blocklists that need an agreement with their operator (SURBL, "
            "URIBL), and with them the `free` lists. They need a resolver that may query them (not a "
            "public forwarder).", since="0.2"),
    Setting("rbl.lists", MapOf(Struct("blocklist", zone=Str(), kind=Choice("ip", "received", "sender", "from", "helo",
                                                                            "uri", "uri_ip"),
                                      symbol=Str(), codes=MapOf(Str(), r"127\.[0-9.]+(/[0-9]+)?", "return code"),
                                      bitmask=Bool(), blocked=ListOf(Str()), enabled=Bool(), public=Bool(),
                                      free=Bool(), description=Str()),
                               r"[a-z0-9_-]+", "list name"), RBL_PUBLIC_LISTS,
            "DNS blocklists by name: `zone`, `kind` (ip, received, sender, from, helo, uri, uri_ip), `symbol` "
            "for any other 127.x answer, `codes` mapping answers (127.0.0.2, or a /CIDR) to symbols, "
            "`bitmask` (codes are bits of the last octet, as SURBL and URIBL answer), `blocked` (answers "
            "that mean the list refuses us; default 127.255.255.0/24), `enabled`, `public` (on only with "
            "rbl.public), `free` (on unless rbl.free_lists is false, or with rbl.public). Symbols must be declared in a rule file. See docs/authentication.md.",
            since="0.2", merge=True),
    Setting("rbl.skip_domains", ListOf(Str()), [],
            "Domains (and their subdomains) never looked up in domain and URI lists: our own and "
            "allowlisted ones.", since="0.2"),
    Setting("rbl.max_uris", Int(minimum=0), 20, "At most this many URL hosts of a message are looked up.",
            since="0.2"),
    # --- Redis, Bayes and the learned classifier
    Setting("redis.url", Str(), "",
            "The Redis master, `redis://[:PASSWORD@]HOST:PORT/DB`: learning writes here, and reads fall back "
            "to it. Empty (and no replicas or sentinels) turns Redis features off. With `redis.sentinels`, "
            "only its password and DB number are used.", since="0.2"),
    Setting("redis.replicas", ListOf(Str()), [],
            "Redis replicas read from (URLs like `redis.url`), nearest first: the first one that answers "
            "is used, the master when none does. A node with replicas and no `redis.url` never writes.", since="0.2"),
    Setting("redis.sentinels", ListOf(Str()), [],
            "Redis Sentinels (`HOST:PORT`) that name the master and replicas of `redis.sentinel_service`; "
            "they are asked again after a failover. Replaces `redis.url` and `redis.replicas`.", since="0.2"),
    Setting("redis.sentinel_service", Str(), "mymaster", "The service (master name) monitored by the Sentinels.", since="0.2"),
    Setting("redis.prefix", Str(), "mg:",
            "Prefix of every key, so that several deployments can share one Redis.", since="0.2"),
    Setting("redis.timeout", Seconds(), 0.5,
            "Bound on connecting to Redis and on each reply; a call takes at most twice this.", since="0.2"),
    Setting("redis.retry_max", Seconds(), 4.0,
            "After a failure a server is not asked for 1 s, then twice as long each time, up to this: "
            "a node is back within this long of its Redis.", since="0.2"),
    Setting("redis.read_only", Bool(), False,
            "This node never writes to Redis (no learning, no autolearn), even with a master configured.", since="0.2"),
    Setting("bayes.enabled", Bool(), True, "Classify with Bayes when Redis is configured.", since="0.2"),
    Setting("bayes.min_learns", Int(minimum=0), 200,
            "Bayes stays silent until this many spam and this many ham messages have been learned.", since="0.2"),
    Setting("bayes.spam_probability", Float(minimum=0.5), 0.6,
            "Spam probability at or above which BAYES_SPAM is added (its weight scales with the probability).",
            since="0.2"),
    Setting("bayes.ham_probability", Float(minimum=0.0), 0.4,
            "Spam probability at or below which BAYES_HAM is added.", since="0.2"),
    Setting("bayes.max_tokens", Int(minimum=1000), 5_000_000,
            "Tokens kept in Redis (about 30 bytes each); past this, learning drops the rarest tokens "
            "(`milterguard bayes expire` does it on demand).", since="0.2"),
    Setting("bayes.cache_slots", Int(minimum=0, maximum=1 << 26), 1 << 18,
            "Token counts each filter process keeps between Bayes look-ups (24 bytes a slot: 6 MB per "
            "process for the default); only the tokens not found there are asked of Redis. 0 turns it off.",
            since="0.4"),
    Setting("bayes.cache_ttl", Seconds(), 60.0,
            "How long a token's counts read from Redis are used before they are read again: what another "
            "node learns (or `milterguard learn`) reaches this node's verdicts within this long. 0 turns "
            "the token cache off.", since="0.4"),
    Setting("bayes.autolearn", Bool(), False,
            "Learn scanned mail on its own: spam at or above `bayes.autolearn_spam`, ham at or below "
            "`bayes.autolearn_ham` (only where this node may write to Redis).", since="0.2"),
    Setting("bayes.autolearn_spam", Float(), 15.0, "Score at or above which autolearn learns a message as spam.",
            since="0.2"),
    Setting("bayes.autolearn_ham", Float(), -2.0, "Score at or below which autolearn learns a message as ham.",
            since="0.2"),
    Setting("ml.enabled", Bool(), True, "Classify with the model trained by `milterguard train`, once there is one.",
            since="0.2"),
    Setting("ml.spam_probability", Float(minimum=0.5), 0.6,
            "Probability at or above which ML_SPAM is added (its weight scales with the probability).", since="0.2"),
    Setting("ml.ham_probability", Float(minimum=0.0), 0.4, "Probability at or below which ML_HAM is added.",
            since="0.2"),
    Setting("ml.poll_interval", Seconds(), 10.0,
            "How often a running filter asks Redis for a new model version and swaps it in.", since="0.2"),
    Setting("ml.max_samples", Int(minimum=100), 20000,
            "Learned messages kept (as token hashes, about 2 KB each) for `milterguard train`; the oldest go first.",
            since="0.2"),
    Setting("ml.default_model", Str(), "builtin",
            "The model used before the site has one of its own, and beside it while that one is young: `builtin` "
            "for the model shipped with milterguard (trained on public corpora, see docs/learning.md), the path of a "
            "model file written by `milterguard train --corpus`, or empty to use none. Needs no Redis. It adds "
            "ML_DEFAULT_SPAM or ML_DEFAULT_HAM.", since="0.3"),
    Setting("ml.default_fade", Int(minimum=0), 5000,
            "The shipped model's symbols count `1 - n / ml.default_fade` of their weight, n being the messages the "
            "site's own model (in Redis) was trained on: from this many on, the site's model alone speaks. "
            "0: the shipped model always counts in full.", since="0.3"),
    # --- content: ClamAV, attachments, content hashes, phishing, lists
    Setting("clamav.address", ClamdAddress(), "",
            "clamd to scan with: `HOST:PORT` (`[v6]:PORT`) for TCP, or the path of its unix socket (`/path` "
            "or `unix:/path`). "
            "Empty turns virus scanning off (logged once at the first message).", since="0.2"),
    Setting("clamav.scan", Choice("message", "attachments"), "message",
            "What goes to clamd: the whole `message` as received (clamd decodes MIME itself), or each "
            "decoded `attachments` part on its own.", since="0.2"),
    Setting("clamav.max_size", Size(), 25 * 1024 * 1024,
            "Largest stream sent to clamd; keep it at or below clamd's StreamMaxLength (25M by default). "
            "Larger messages are not scanned and get CLAMAV_TOO_LARGE.", since="0.2"),
    Setting("clamav.timeout", Seconds(), 2.0,
            "Socket timeout for clamd, further limited by what is left of checks.message_budget; on expiry, "
            "a refused connection or an error answer the message gets CLAMAV_TEMPFAIL and is not held back.",
            since="0.2"),
    Setting("attachments.dangerous_extensions", ListOf(Str()),
            ("exe scr pif com bat cmd cpl msi msp msix appx appxbundle hta jar js jse vbs vbe wsf wsh wsc sct ps1 "
             "psm1 lnk scf reg iso img vhd vhdx dmg chm dll sys xll application gadget msc inf "
             "settingcontent-ms").split(),
            "Extensions of executables, scripts, shortcuts and disk images (MIME_EXEC_ATTACHMENT; inside a zip "
            "MIME_ARCHIVE_EXEC). Lower case, without the dot.", since="0.2"),
    Setting("attachments.macro_extensions", ListOf(Str()), "docm dotm xlsm xltm xlam xlsb pptm potm ppsm sldm".split(),
            "Extensions of macro-enabled Office files (MIME_ATTACH_OFFICE_MACRO; inside a zip MIME_ARCHIVE_EXEC).",
            since="0.2"),
    Setting("attachments.cover_extensions", ListOf(Str()),
            "pdf doc docx xls xlsx ppt pptx rtf txt jpg jpeg png gif htm html zip".split(),
            "Document extensions that hide a dangerous one after them (`invoice.pdf.exe`: MIME_DOUBLE_EXT).",
            since="0.2"),
    Setting("attachments.archive_max_bytes", Size(), 10 * 1024 * 1024,
            "Zip attachments larger than this are not opened. Only the directory of an archive is read, "
            "nothing is decompressed.", since="0.2"),
    Setting("attachments.archive_max_entries", Int(minimum=1), 1000,
            "At most this many names of one archive are looked at.", since="0.2"),
    Setting("attachments.nested_max_bytes", Size(), 1024 * 1024,
            "A zip inside a zip attachment is opened (one level down, its directory read) when it declares "
            "at most this size; only such zips are decompressed, and never past this size. 0 turns it off.",
            since="0.2"),
    Setting("attachments.links", Bool(), True,
            "Read the links of PDF attachments (link annotations) and the QR codes of images (PNG, JPEG, GIF, "
            "inline or attached, `data:` images in HTML) and of the images in PDFs: they join the message's URLs "
            "and go through the URL rules, maps and blocklists (symbols PDF_LINK, QR_CODE_URL). Only a message "
            "with a PDF or an image costs anything.", since="0.3"),
    Setting("attachments.pdf_max_bytes", Size(), 5 * 1024 * 1024,
            "PDF attachments larger than this are not opened for links.", since="0.3"),
    Setting("attachments.pdf_max_pages", Int(minimum=1), 10,
            "At most this many pages of a PDF are read for links and images.", since="0.3"),
    Setting("attachments.image_max_bytes", Size(), 5 * 1024 * 1024,
            "Images larger than this are not searched for QR codes.", since="0.3"),
    Setting("attachments.image_max_pixels", Int(minimum=1), 4_000_000,
            "Images of more pixels than this (read from their header, before decoding) are not searched for "
            "QR codes; neither are images under 40 pixels a side. Larger ones are scanned scaled down to "
            "about 1,000 pixels a side.", since="0.3"),
    Setting("attachments.max_images", Int(minimum=0), 4,
            "At most this many images of one message (attached, inline, in HTML or in PDFs) are searched for "
            "QR codes.", since="0.3"),
    Setting("attachments.pdf_render", Bool(), True,
            "Render the first pages of a PDF that draw many paths (and whose PDF has no QR code in an image) "
            "with Poppler's pdftoppm (Debian package poppler-utils), run as its own process, and search the "
            "picture for a QR code drawn as vector paths. Without pdftoppm this is logged once and skipped.",
            since="0.4"),
    Setting("attachments.pdf_render_pages", Int(minimum=0), 2,
            "Only the first this many pages of a PDF may be rendered, and at most this many pages of one "
            "message (0: none).", since="0.4"),
    Setting("attachments.pdf_render_side", Int(minimum=200, maximum=4000), 1200,
            "A rendered page is at most this many pixels on its long side, whatever size the page claims.",
            since="0.4"),
    Setting("attachments.pdf_render_memory", Size(), 512 * 1024 * 1024,
            "Address space allowed to the pdftoppm process (prlimit --as); it is killed, and the page not "
            "read, past it, and at the end of attachments.links_time.", since="0.4"),
    Setting("attachments.links_time", Seconds(), 1.0,
            "Time for reading the PDFs and images of one message; what is left when it runs out is not "
            "read.", since="0.3"),
    Setting("phishing.protected_names", MapOf(ListOf(Str()), r"[^\s].*", "brand or person name"),
            {"paypal": ["paypal.com"], "apple": ["apple.com", "icloud.com"],
             "microsoft": ["microsoft.com", "office.com", "outlook.com", "live.com", "office365.com"],
             "amazon": ["amazon.com", "amazon.co.uk", "amazon.de", "amazon.fr", "amazonses.com"],
             "netflix": ["netflix.com"], "docusign": ["docusign.com", "docusign.net"], "dhl": ["dhl.com", "dhl.de"],
             "fedex": ["fedex.com"], "wells fargo": ["wellsfargo.com"], "chase": ["chase.com", "jpmorgan.com"]},
            "Names (brands, people: whole words, any case) that only the listed domains may begin a From "
            "display name with (PHISH_DISPLAY_NAME); the domains are also protected from lookalikes. The "
            "recipient's own domain is always protected.", since="0.2", merge=True),
    Setting("phishing.brands_map", Str(), "brands.map",
            "The list of brands and their domains (`name: domain ...` a line) that PHISH_BRAND_* judge: a file "
            "name looked up in rules.maps_dirs, or a path; empty turns the brand checks off. A file of the same "
            "name in /etc/milterguard/maps replaces the shipped one.", since="0.3"),
    Setting("phishing.protected_domains", ListOf(Str()), [],
            "More domains protected from lookalikes (PHISH_LOOKALIKE_*): your own and your partners'.", since="0.2"),
    Setting("phishing.lookalike_distance", Int(minimum=0, maximum=3), 1,
            "Largest edit distance (insertions, deletions, changes, swaps) at which a domain counts as a "
            "lookalike of a protected one.", since="0.2"),
    Setting("lists.dir", Str(), "{etc}/lists",
            "Directory of the allow and block lists: `allow.map` and `block.map` for all mail, "
            "`DOMAIN/allow.map` and `DOMAIN/block.map` for recipients at DOMAIN. Empty turns lists off "
            "(with `lists.backend: files`; with `redis`, this is where `milterguard list import` reads).",
            since="0.2"),
    Setting("lists.check_interval", Seconds(), 1.0,
            "How often the lists are looked at for changes: the files' times and sizes, or the version "
            "key in Redis (one GET); a changed list is read again. The maps of rules in Redis "
            "(`map: redis:NAME`) are looked at as often.", since="0.2"),
    Setting("lists.backend", Choice("files", "redis"), "files",
            "Where the allow and block lists live: `files` under `lists.dir` on each node, or `redis` (a set "
            "per list under `redis.prefix`, shared by every node; needs `redis.url`, replicas or sentinels). "
            "With `redis`, each process keeps a copy of the lists and keeps using it while Redis is away; "
            "`milterguard list` edits the sets and `milterguard list import` copies the files into them.",
            since="0.3"),
    Setting("fuzzy.enabled", Bool(), True,
            "Compare messages with the content hashes of reported spam in Redis (needs redis.url, "
            "replicas or sentinels).", since="0.2"),
    Setting("fuzzy.max_distance", Int(minimum=0, maximum=7), 5,
            "Largest Hamming distance (bits of 64) at which a SimHash counts as a near copy (FUZZY_DENIED).",
            since="0.2"),
    Setting("fuzzy.min_words", Int(minimum=1), 20,
            "Messages with fewer words than this are not hashed: short texts are too alike.", since="0.2"),
    Setting("fuzzy.ttl", Seconds(), 30 * 86400.0,
            "How long a reported hash is kept (seconds); reporting it again starts its time anew.", since="0.2"),
]

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}

# Top level sections and the keys each holds, for the unknown-key errors.
SECTIONS: dict[str, set[str]] = {}
for _s in SETTINGS:
    _head, _, _rest = _s.key.partition(".")
    SECTIONS.setdefault(_head, set()).add(_rest)


def redis_configured(config: Any) -> bool:
    """Whether the configuration names a Redis at all (URL, replicas or Sentinels).

    Here rather than in milterguard.clients.redis_client, so that the checks can ask it without
    importing the Redis client."""
    return bool(config.get("redis.url") or config.get("redis.replicas") or config.get("redis.sentinels"))


def node_name(config: Any) -> str:
    """`node.name`, or the host name when it is empty."""
    return config.get("node.name") or socket.gethostname()


def default_workers() -> int:
    """One worker per usable CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)

