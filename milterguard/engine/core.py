"""The engine: runs the rules and checks of each stage and scores the hits.

Front ends drive a `Session` (engine/pipeline.py), which calls `run_stage`
as each SMTP stage arrives and `finish` at end of message: the milter from
pymilter's callbacks, the CLI through `evaluate`, for a message read from a
file.  Neither front end imports a check.
"""

from __future__ import annotations

import logging
import time

from milterguard import scoring
from milterguard.config import Config
from milterguard.checks import registry
from milterguard.engine.pipeline import Session, run_session
from milterguard.model import Action, Connection, Hits, Stage, Transaction, Verdict
from milterguard.ruleset.rules import PatternSet, Rule, RuleSet, load_rules
from milterguard.ruleset.weights import load_weights
from milterguard.settings import redis_configured
from milterguard.stores.redis_maps import maps_for

log = logging.getLogger("milterguard.engine")

# Symbols the engine itself emits; the rule files give their weights.
ENGINE_SYMBOLS = {
    "CHECK_ERROR": "engine",
    "CHECK_SLOW": "engine",
    "CHECK_BUDGET_EXCEEDED": "engine",
    "SCAN_TRUNCATED": "engine",
}
_ENGINE_EMITS = frozenset(ENGINE_SYMBOLS)
_DECIDED = (Action.REJECT, Action.TEMPFAIL, Action.DISCARD)
_RULES_TIMING = {stage: f"rules:{stage.label}" for stage in Stage}


class RulesError(Exception):
    """The rule files do not load; `errors` has one file:line message each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Scan:
    """What a check sees: the connection, the transaction and the message."""

    __slots__ = ("conn", "txn", "config", "stage")

    def __init__(self, conn: Connection, txn: Transaction | None, config: Config, stage: Stage) -> None:
        self.conn = conn
        self.txn = txn
        self.config = config
        self.stage = stage

    @property
    def message(self):
        """The parsed message at end of message; before that, the headers alone."""
        txn = self.txn
        if txn is None:
            return None
        if txn.message is not None:
            return txn.message
        return header_view(txn, self.config)


def header_view(txn: Transaction, config: Config):
    """The headers received so far, parsed (again when more have come since)."""
    view = txn.header_view
    if view is None or view.header_count != len(txn.headers):
        from milterguard.mail.message import Message

        txn.header_view = Message.from_parts(
            txn.headers, b"", max_scan_bytes=config["message.max_scan_bytes"],
            max_text_chars=config["message.max_text_chars"],
        )
    return txn.header_view


def link_limits(config: Config):
    """The bounds of reading links from PDFs and QR codes, from the attachments.* settings."""
    from milterguard.mail.attached import LinkLimits

    return LinkLimits(enabled=config["attachments.links"], pdf_max_bytes=config["attachments.pdf_max_bytes"],
                      pdf_max_pages=config["attachments.pdf_max_pages"],
                      image_max_bytes=config["attachments.image_max_bytes"],
                      image_max_pixels=config["attachments.image_max_pixels"],
                      max_images=config["attachments.max_images"], seconds=config["attachments.links_time"],
                      pdf_render=config["attachments.pdf_render"],
                      pdf_render_pages=config["attachments.pdf_render_pages"],
                      pdf_render_side=config["attachments.pdf_render_side"],
                      pdf_render_memory=config["attachments.pdf_render_memory"])


def full_message(txn: Transaction, config: Config):
    if txn.message is None:
        from milterguard.mail.message import Message

        view = txn.header_view
        limits = {"max_scan_bytes": config["message.max_scan_bytes"], "max_text_chars": config["message.max_text_chars"],
                  "link_limits": link_limits(config)}
        if view is not None and view.header_count == len(txn.headers):
            # The headers parsed at end of headers serve again: only the body is new.
            txn.message = view.with_body(txn.body, body_size=txn.body_size or None, **limits)
        else:
            txn.message = Message.from_parts(txn.headers, txn.body, body_size=txn.body_size or None, **limits)
    return txn.message


# How each match target turns the scan into the texts its patterns look at.
def _values(rule_key: tuple, scan: Scan) -> list[str]:
    target, header, part = rule_key
    conn, txn = scan.conn, scan.txn
    if target == "client_name":
        return [conn.client_name] if conn.client_name else []
    if target == "helo":
        return [conn.helo]
    if target == "mail_from":
        return [txn.mail_from] if txn else []
    if target == "rcpt":
        return txn.rcpts[-1:] if txn else []
    msg = scan.message
    if msg is None:
        return []
    if target == "header":
        if part == "value":
            return msg.header_values(header)
        if part == "raw":
            return msg.header_raw(header)
        pairs = msg.addresses(header)
        return [a for _, a in pairs] if part == "addr" else [n for n, _ in pairs]
    if target == "allheaders":
        return [msg.header_block()]
    if target == "body":
        return [msg.text]
    if target == "rawbody":
        return [msg.rawbody]
    if target == "uri":
        return [u.url for u in msg.urls]
    if target == "uri_host":
        return [u.host for u in msg.urls if u.host]
    if target == "uri_text":
        return [u.text for u in msg.urls if u.text]
    if target == "attachment_name":
        return [p.filename for p in msg.parts if p.filename]
    if target == "content_type":
        return [p.content_type for p in msg.parts]
    raise ValueError(f"unknown target {target}")


def _matched(rule, data: bytes, value: str):
    """What RULE matched in DATA, found only when read (the milter never reads it)."""

    def find() -> str:
        text = rule.matched_text(data)
        return text if text is not None else value[:80]

    return find


def _map_values(key: str, scan: Scan) -> list[str]:
    conn, txn = scan.conn, scan.txn
    if key == "client_ip":
        return [conn.client_ip] if conn.client_ip else []
    if key == "client_name":
        return [conn.client_name] if conn.client_name and not conn.client_name.startswith("[") else []
    if key == "helo":
        return [conn.helo] if conn.helo else []
    if txn is None:
        return []
    if key == "mail_from":
        return [txn.mail_from] if txn.mail_from else []
    if key == "mail_from_domain":
        return [txn.mail_from_domain] if txn.mail_from_domain else []
    if key == "rcpt":
        return txn.rcpts[-1:]
    if key == "rcpt_domain":
        return [r.rpartition("@")[2] for r in txn.rcpts[-1:] if "@" in r]
    msg = scan.message
    if msg is None:
        return []
    if key == "from":
        return [msg.from_addr] if msg.from_addr else []
    if key == "from_domain":
        return [msg.from_domain] if msg.from_domain else []
    if key == "reply_to":
        return [a for _, a in msg.addresses("Reply-To") if a]
    if key == "uri_host":
        return list(dict.fromkeys(u.host for u in msg.urls if u.host))
    raise ValueError(f"unknown map key {key}")


class Engine:
    """Rules and checks of one configuration, ready to run."""

    def __init__(self, config: Config, ruleset: RuleSet, strict: bool = False) -> None:
        self.config = config
        self.ruleset = ruleset
        self.strict = strict
        disabled = set(config["checks.disabled"])
        self.checks: dict[Stage, list[registry.CheckSpec]] = {}
        for stage in Stage:
            specs = [s for s in registry.CHECKS.values()
                     if s.stage == stage and s.name not in disabled and s.applies(config)]
            # A check whose every symbol is disabled need not run at all.
            specs = [s for s in specs if any(ruleset.active(sym) for sym in ruleset.rules if sym in s.emits)]
            self.checks[stage] = registry.ordered(specs)
        enabled = {s.name for specs in self.checks.values() for s in specs}
        self.starters = {stage: [(name, fn) for name, fn in registry.STARTERS.get(stage, ()) if name in enabled]
                         for stage in Stage}
        for name in sorted(enabled & registry.PREPARERS.keys()):
            try:
                registry.PREPARERS[name](config)
            except (ValueError, OSError) as exc:
                # A data file a check reads (the brands map) is missing or malformed: say where.
                raise RulesError([f"check {name}: {exc}"]) from None
        self.verdict_hooks = [(name, fn) for name, fn in registry.VERDICT_HOOKS if name in enabled]
        self.budget = config["checks.message_budget"]
        self.check_budget = config["checks.check_budget"]
        # Maps in Redis (`map: redis:NAME`): a copy in this process, read now and kept current.
        names = {rule.redis_map for rules in ruleset.list_rules.values() for rule in rules if rule.redis_map}
        self.redis_maps = maps_for(config) if names else None
        if self.redis_maps is not None:
            self.redis_maps.watch(names)

    @classmethod
    def load(cls, config: Config, strict: bool = False) -> "Engine":
        """Load the rules of CONFIG; raise RulesError listing every fault."""
        ruleset = load_ruleset(config)
        if ruleset.errors:
            raise RulesError(ruleset.errors)
        return cls(config, ruleset, strict=strict)

    def new_hits(self) -> Hits:
        return Hits(strict=self.strict)

    # ------------------------------------------------------------ stages

    def run_stage(self, stage: Stage, conn: Connection, txn: Transaction | None, hits: Hits) -> Verdict | None:
        """Run STAGE's rules and checks into HITS.

        Returns a verdict when a symbol with a fixed reject, tempfail or
        discard action has hit, so that the front end can act at once.
        """
        timings = txn.timings if txn is not None else conn.timings
        scan = Scan(conn, txn, self.config, stage)
        started = txn.started if txn is not None else None
        mark = hits.mark()
        key = _RULES_TIMING[stage]
        starters = self.starters[stage]
        if starters:
            self._run_starters(stage, scan, hits, timings, before_rules=True)
        t0 = time.perf_counter()
        hits._enter(stage, "rules", None)
        self._run_rules(stage, scan, hits)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        if starters:
            self._run_starters(stage, scan, hits, timings, before_rules=False)
        seen, decided = -1, None
        found = hits._hits  # its length tells whether a check added a hit
        for spec in self.checks[stage]:
            if started is not None and time.monotonic() - started > self.budget:
                hits._enter(stage, "engine", _ENGINE_EMITS)
                hits.add("CHECK_BUDGET_EXCEEDED", spec.name, where="engine")
                continue
            if len(found) != seen:  # only a new hit can settle the message
                seen, decided = len(found), scoring.forced_action(hits, self.ruleset)
            if decided is not None and decided[0] in _DECIDED:
                timings[spec.name] = 0.0  # decided already: the costlier checks are skipped
                continue
            self._run_check(spec, scan, hits, timings)
        if stage == Stage.EOM and txn is not None and txn.message is not None and txn.message.truncated:
            hits._enter(stage, "engine", _ENGINE_EMITS)
            hits.add("SCAN_TRUNCATED", f"{txn.message.size} bytes", where="engine")
        # Hits are only ever added here, so an unchanged count means an unchanged answer.
        forced = decided if len(found) == seen else scoring.forced_action(hits, self.ruleset)
        if forced and forced[0] in _DECIDED and stage < Stage.EOM and self.config["actions.early_reject"]:
            verdict = scoring.score(hits, self.ruleset, self.config, txn.rcpt_domains if txn else [], stage)
            verdict.timings = dict(timings)
            if stage == Stage.RCPT and txn.rcpts and forced[1] in hits.names_since(mark):
                # Decided by this recipient's own hits: only it is refused (the MTA answers its
                # RCPT alone); the transaction forgets them and goes on with the others.
                verdict.rcpt = txn.rcpts[-1]
                hits.rollback(mark)
            return verdict
        return None

    def _run_verdict_hooks(self, conn: Connection, txn: Transaction, verdict: Verdict) -> None:
        """Tell the checks that asked for it (autolearn) how the message was scored."""
        for name, fn in self.verdict_hooks:
            t0 = time.perf_counter()
            try:
                fn(Scan(conn, txn, self.config, Stage.FINAL), verdict)
            except Exception as exc:  # noqa: BLE001 - the verdict stands whatever a hook does
                if self.strict:
                    raise
                log.error("after-verdict %s failed for %s: %s: %s", name, txn.queue_id or conn.ident,
                          type(exc).__name__, exc)
            txn.timings[f"{name}:verdict"] = time.perf_counter() - t0

    def _run_starters(self, stage: Stage, scan: Scan, hits: Hits, timings: dict[str, float],
                      before_rules: bool = False) -> None:
        """Let later checks start their lookups now, so that they run while the MTA talks on
        (or, for those registered `before_rules`, while this stage's rules run)."""
        starters = [(name, fn) for name, fn in self.starters[stage] if (fn in registry.BEFORE_RULES) == before_rules]
        if not starters:
            return
        decided = scoring.forced_action(hits, self.ruleset)
        if decided is not None and decided[0] in _DECIDED:
            return  # the message is settled: nothing later will collect them
        for name, fn in starters:
            t0 = time.perf_counter()
            try:
                fn(scan)
            except Exception as exc:  # noqa: BLE001 - the check itself reports what went wrong
                if self.strict:
                    raise
                ref = scan.txn.queue_id if scan.txn and scan.txn.queue_id else scan.conn.ident
                log.error("starting %s failed for %s: %s: %s", name, ref, type(exc).__name__, exc)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

    def _run_check(self, spec: registry.CheckSpec, scan: Scan, hits: Hits, timings: dict[str, float]) -> None:
        hits._enter(scan.stage, spec.name, spec.emits)
        facts = scan.txn.facts if scan.txn is not None else scan.conn.facts
        dns_session = facts.dns
        waited = dns_session.budget.spent if dns_session is not None else 0.0
        mark = hits.mark()
        t0 = time.perf_counter()
        try:
            spec.fn(scan, hits)
        except Exception as exc:  # noqa: BLE001 - a failing check must never break the session
            if self.strict:
                raise
            ref = scan.txn.queue_id if scan.txn and scan.txn.queue_id else scan.conn.ident
            log.error("check %s failed for %s: %s: %s", spec.name, ref, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            hits._enter(scan.stage, "engine", _ENGINE_EMITS)
            hits.add("CHECK_ERROR", spec.name, where="engine", text=f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - t0
        timings[spec.name] = timings.get(spec.name, 0.0) + elapsed
        # Waits for DNS answers are bounded by the message's DNS budget and reported by
        # the check's own *_TEMPFAIL symbol; the check's budget is for its own work.
        dns_session = facts.dns
        if dns_session is not None:
            elapsed -= dns_session.budget.spent - waited
        # So is a wait for a dependency that failed (clamd frozen): its own timeout bounds it,
        # its *_TEMPFAIL symbol and its outage line report it, not one line per message.
        if elapsed > self.check_budget and not any(s.endswith("_TEMPFAIL") for s in hits.names_since(mark)):
            ref = scan.txn.queue_id if scan.txn and scan.txn.queue_id else scan.conn.ident
            log.warning("check %s took %.2fs for %s (budget %.2fs)", spec.name, elapsed, ref, self.check_budget)
            hits._enter(scan.stage, "engine", _ENGINE_EMITS)
            hits.add("CHECK_SLOW", spec.name, where="engine")

    def _run_rules(self, stage: Stage, scan: Scan, hits: Hits) -> None:
        rs = self.ruleset
        for rule in rs.list_rules.get(stage, ()):
            found = rule.map if rule.map is not None else self.redis_maps.get(rule.redis_map)
            if found is None:
                continue  # a map in Redis with no entries (or none read yet)
            for value in _map_values(rule.map_key, scan):
                entry = found.match_ip(value) if rule.map_key == "client_ip" else found.match_any(value)
                if entry is not None:
                    hits.add(rule.symbol, value, where=rule.where, text=f"{value} (entry {entry})")
                    break
        if stage >= Stage.HEADERS and scan.txn is not None:
            msg = scan.message
            for rule in rs.exists_rules.get(stage, ()):
                if msg.has_header(rule.header) == rule.exists:
                    hits.add(rule.symbol, where=rule.where, text="present" if rule.exists else "absent")
        for pset in rs.pattern_sets.get(stage, ()):
            values = [v for v in _values(pset.key, scan) if v]
            # Encoded once here for the set and for every rule that hit, not once per regex call.
            encoded = [v.encode("utf-8") for v in values]
            found = pset.matches(encoded) if encoded else {}
            if found or pset.has_negated:
                self._report(pset, values, encoded, found, hits)

    @staticmethod
    def _report(pset: PatternSet, values: list[str], encoded: list[bytes], found: dict[int, int], hits: Hits) -> None:
        for index, rule in enumerate(pset.rules):
            if rule.negate:
                if index not in found:
                    hits.add(rule.symbol, where=rule.where, text="(no match)")
                continue
            vi = found.get(index)
            if vi is None:
                continue
            hits.add(rule.symbol, where=rule.where, text=_matched(rule, encoded[vi], values[vi]))

    def _run_composites(self, hits: Hits) -> None:
        hits._enter(Stage.FINAL, "composites", None)
        rules = self.ruleset.rules

        def has(symbol: str) -> bool:
            return symbol in hits and rules.get(symbol) is not None and rules[symbol].enabled

        def has_group(name: str) -> bool:
            for hit in hits:
                rule = rules.get(hit.symbol)
                if rule is not None and rule.group == name and rule.enabled and rule.weight != 0:
                    return True
            return False

        from milterguard.ruleset import composite

        for comp in self.ruleset.composites:
            if comp.enabled and composite.evaluate(comp.expr, has, has_group):
                hits.add(comp.symbol, where="composite", text=comp.expr_text)

    def finish(self, conn: Connection, txn: Transaction, hits: Hits) -> Verdict:
        """End of message: parse, run the EOM stage and the composites, and score."""
        t0 = time.perf_counter()
        full_message(txn, self.config)
        txn.timings["parse"] = txn.timings.get("parse", 0.0) + time.perf_counter() - t0
        early = self.run_stage(Stage.EOM, conn, txn, hits)
        if early is not None:  # pragma: no cover - run_stage returns none at EOM
            return early
        t1 = time.perf_counter()
        self._run_composites(hits)
        verdict = scoring.score(hits, self.ruleset, self.config, txn.rcpt_domains, Stage.FINAL)
        scoring.finalize(verdict, txn.facts, txn.headers, self.config, txn.rcpt_domains)
        txn.timings["composites+scoring"] = time.perf_counter() - t1
        self._run_verdict_hooks(conn, txn, verdict)
        verdict.timings = dict(conn.timings) | dict(txn.timings)
        verdict.elapsed = time.monotonic() - txn.started
        return verdict

    def start_transaction(self, conn: Connection, txn: Transaction) -> Hits:
        """Hits of a new transaction: the connection's hits carried over."""
        hits = self.new_hits()
        if conn.hits is not None:
            hits.merge(conn.hits)
        return hits

    def session(self, conn: Connection) -> Session:
        """The stage pipeline of one SMTP connection, for a front end to drive."""
        return Session(self, conn)

    def evaluate(self, conn: Connection, txn: Transaction) -> Verdict:
        """A whole session for one message, through the same pipeline as the milter; for the CLI.

        Stops at the first verdict that ends the session, as the milter does.
        """
        return run_session(self, conn, txn)


def _symbol_overrides(config: Config) -> dict[str, dict]:
    """The `symbols:` setting: changes to the rule files' declarations."""
    return {symbol: dict(change) for symbol, change in config["symbols"].items()}


class _Declared(dict):
    """symbol -> check; a symbol of a declared family (`RBL_*`) counts as declared too."""

    def __init__(self, symbols: dict[str, str], families: dict[str, str]) -> None:
        super().__init__(symbols)
        self.families = families

    def __contains__(self, symbol: object) -> bool:
        return dict.__contains__(self, symbol) or (
            isinstance(symbol, str) and any(symbol.startswith(p) for p in self.families))


def load_ruleset(config: Config) -> RuleSet:
    """Load the rule files named by CONFIG, cross-checked with the Python checks."""
    import milterguard.checks  # noqa: F401 - registers the checks

    declared = _Declared(registry.all_declared(), registry.declared_families())
    for fn in registry.CONFIGURED_SYMBOLS:
        declared.update(fn(config))
    declared.update(ENGINE_SYMBOLS)
    overrides = _symbol_overrides(config)
    rs = load_rules(
        config.paths("rules.files"),
        share_dir=config.share_dir,
        maps_dirs=[config.expand(p) for p in config["rules.maps_dirs"]],
        overrides=overrides,
        group_caps=config["groups"],
        check_symbols=declared,
        redis=redis_configured(config),
    )
    # Weight files (ruleset/weights.py): over the rule files, under the `symbols:` setting.
    weights, errors = load_weights(config.paths("rules.weights"))
    rs.errors.extend(errors)
    for symbol, (weight, where) in weights.items():
        rule = rs.rules.get(symbol)
        if rule is None:
            rs.errors.append(f"{where}: weight for {symbol}, which no rule declares")
        elif "weight" not in overrides.get(symbol, {}):
            rule.weight = weight
    return rs


def rule_for(engine: Engine, symbol: str) -> Rule | None:
    return engine.ruleset.rules.get(symbol)
