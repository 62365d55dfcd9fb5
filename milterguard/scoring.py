"""Turn hits into a score and an action.  Only this module does that.

- a hit's weight is its symbol's declared weight times the hit's factor;
  a symbol in `state: testing` or consumed by a composite counts 0;
- group caps limit what a group adds up to (`max_score`) or takes away
  (`min_score`), scaling its hits down evenly;
- the score picks the action by the thresholds (per recipient domain
  where configured; across several domains the most lenient action wins);
- a symbol with a fixed `action:` decides the action itself (the most
  severe such symbol wins), whatever the score;
- the mode (enforce, tag-only, shadow) says what the front end applies;
- `finalize` decides what else the front end does with the message: the
  recipients it removes, the header edits (X-Spam-*, Authentication-Results,
  forged ones removed, the Subject tag), whether autolearn takes it, and
  where a message held for review goes (our quarantine or the MTA's hold queue).

Checks only report hits and facts; every decision drawn from them is here.
"""

from __future__ import annotations

from milterguard.model import Action, Facts, HeaderEdits, Hits, ScoredHit, Stage, Thresholds, Verdict
from milterguard.ruleset.rules import RuleSet
from milterguard.settings import node_name


def thresholds_for(config, domain: str | None) -> Thresholds:
    base = dict(config["thresholds"])
    if domain:
        policy = _domain_policy(config, domain)
        if policy:
            base.update(policy.get("thresholds", {}))
    return Thresholds(reject=base["reject"], review=base["review"], tag=base["tag"])


def _domain_policy(config, domain: str) -> dict | None:
    domains = config["domains"]
    domain = domain.lower()
    while domain:
        if domain in domains:
            return domains[domain]
        _, _, domain = domain.partition(".")
    return None


def mode_for(config, domain: str | None) -> str:
    if domain:
        policy = _domain_policy(config, domain)
        if policy and "mode" in policy:
            return policy["mode"]
    return config["actions.mode"]


def applied_action(action: Action, mode: str) -> Action:
    """What the front end does with ACTION under MODE."""
    if mode == "shadow":
        return Action.ACCEPT
    if mode == "tag-only":
        return Action.TAG if action >= Action.TAG else Action.ACCEPT
    return action


def score(hits: Hits, ruleset: RuleSet, config, rcpt_domains: list[str], stage: Stage = Stage.FINAL) -> Verdict:
    """Score HITS under the rules and configuration."""
    consumed: dict[str, str] = {}
    for comp in ruleset.composites:
        if comp.symbol in hits and comp.enabled:
            for name in comp.consumes:
                consumed.setdefault(name, comp.symbol)

    scored: list[ScoredHit] = []
    for hit in hits:
        rule = ruleset.rules.get(hit.symbol)
        if rule is None or not rule.enabled:
            continue
        base = rule.weight * hit.factor
        weight = base
        if rule.state == "testing" or hit.symbol in consumed:
            weight = 0.0
        scored.append(
            ScoredHit(
                symbol=hit.symbol, weight=weight, base_weight=base, group=rule.group,
                description=rule.description, stage=hit.stage, options=list(hit.options),
                where=hit.where or rule.where, _text=hit._text if not callable(hit._text) else (lambda h=hit: h.text),
                source=rule.source, emitter=hit.source,
                state=rule.state, consumed_by=consumed.get(hit.symbol, ""), action=rule.action,
            )
        )

    # Group caps: scale a group's positive (negative) weights so they add up to the cap.
    by_group: dict[str, list[ScoredHit]] = {}
    for sh in scored:
        by_group.setdefault(sh.group, []).append(sh)
    for name, members in by_group.items():
        group = ruleset.groups.get(name)
        if group is None:
            continue
        pos = sum(m.weight for m in members if m.weight > 0)
        if group.max_score is not None and pos > group.max_score > 0:
            ratio = group.max_score / pos
            for m in members:
                if m.weight > 0:
                    m.weight *= ratio
        neg = sum(m.weight for m in members if m.weight < 0)
        if group.min_score is not None and neg < group.min_score < 0:
            ratio = group.min_score / neg
            for m in members:
                if m.weight < 0:
                    m.weight *= ratio

    total = round(sum(sh.weight for sh in scored), 2)
    scored.sort(key=lambda sh: (-abs(sh.weight), sh.symbol))

    domains = rcpt_domains or [None]
    choices = []
    for domain in domains:
        th = thresholds_for(config, domain)
        action = th.action_for(total)
        mode = mode_for(config, domain)
        choices.append((applied_action(action, mode), action, th, mode))
    # The most lenient applied action across recipient domains.
    applied, action, thresholds, mode = min(choices, key=lambda c: (c[0], c[1]))
    reason = "score"

    forced = [sh for sh in scored if sh.action is not None and sh.state != "testing"]
    if forced:
        top = max(forced, key=lambda sh: (sh.action, sh.symbol))
        action = top.action
        reason = top.symbol
        applied = applied_action(action, mode)

    return Verdict(
        score=total, action=action, thresholds=thresholds, hits=scored, reason=reason,
        stage=stage, mode=mode, applied=applied,
    )


def forced_action(hits: Hits, ruleset: RuleSet) -> tuple[Action, str] | None:
    """The most severe fixed action among HITS, if any (for early verdicts)."""
    best: tuple[Action, str] | None = None
    for hit in hits:
        rule = ruleset.rules.get(hit.symbol)
        if rule is None or not rule.enabled or rule.action is None or rule.state == "testing":
            continue
        if best is None or rule.action > best[0]:
            best = (rule.action, hit.symbol)
    return best


def spam_headers(verdict: Verdict, with_symbols: bool = True) -> list[tuple[str, str]]:
    """The X-Spam-* headers for VERDICT, in the order they are added."""
    th = verdict.thresholds
    flagged = verdict.action >= Action.TAG
    headers = [
        ("X-Spam-Flag", "YES" if flagged else "NO"),
        ("X-Spam-Score", f"{verdict.score:.2f}"),
        (
            "X-Spam-Status",
            f"{'Yes' if flagged else 'No'}, score={verdict.score:.2f} tag={th.tag:g} review={th.review:g} "
            f"reject={th.reject:g} action={verdict.action.label}",
        ),
    ]
    if with_symbols:
        parts = []
        for sh in verdict.hits:
            text = f"{sh.symbol}({sh.weight:.2f})"
            if sh.options:
                text += "[" + ",".join(o.replace(",", " ").replace("]", ")")[:60] for o in sh.options[:3]) + "]"
            parts.append(text)
        # Fold after each symbol so that no line grows past the RFC 5322 limit.
        headers.append(("X-Spam-Symbols", ",\n\t".join(parts) if parts else "none"))
    return headers


# Symbols of the learned classifiers: autolearn leaves them out of the score it
# judges by, so that the classifiers do not feed on their own opinion (as
# SpamAssassin does).
LEARNED_PREFIXES = ("BAYES_", "ML_")


def autolearn_label(verdict: Verdict, config) -> str:
    """"spam", "ham" or "" : what autolearn takes the message as, when bayes.autolearn is on."""
    if not config["bayes.autolearn"]:
        return ""
    score = verdict.score - sum(h.weight for h in verdict.hits if h.symbol.startswith(LEARNED_PREFIXES))
    if score >= config["bayes.autolearn_spam"]:
        return "spam"
    if score <= config["bayes.autolearn_ham"]:
        return "ham"
    return ""


def header_edits(verdict: Verdict, facts: Facts, headers: list[tuple[str, str]], config) -> HeaderEdits:
    """The header changes for VERDICT of a message with HEADERS (none in shadow mode)."""
    edits = HeaderEdits()
    if verdict.mode == "shadow":
        return edits
    if config["headers.remove_upstream"]:
        # X-Spam-* of whoever handled the message before us: highest index first, so
        # that the lower ones keep their numbers.
        counts: dict[str, int] = {}
        for name, _value in headers:
            if name.lower().startswith("x-spam-"):
                counts[name] = counts.get(name, 0) + 1
        for name, count in counts.items():
            edits.remove.extend((name, index) for index in range(count, 0, -1))
    results = facts.auth_results
    if results is not None:
        # Those that claim our authserv-id are forged, or ours from an earlier pass (RFC 8601 5).
        edits.remove.extend(("Authentication-Results", index) for index in sorted(results.forged, reverse=True))
        edits.prepend.append(("Authentication-Results", results.header()))
    if config["headers.enabled"]:
        edits.add.extend(spam_headers(verdict, config["headers.symbols"]))
        if config["headers.node"]:
            edits.add.append(("X-Spam-Node", node_name(config)))
    tag = config["actions.subject_tag"]
    if tag and verdict.applied in (Action.TAG, Action.REVIEW):
        subject = next((value for name, value in headers if name.lower() == "subject"), None)
        if subject is None or not subject.startswith(tag):
            edits.subject = f"{tag} {subject or ''}".rstrip()
    return edits


def quarantine_for(config, rcpt_domains: list[str]) -> str:
    """Where a message held for review goes: "store" or "mta-hold".

    Per recipient domain, as the thresholds; when the recipients' domains differ, `mta-hold`
    wins, so that a domain that asked for the MTA's hold queue finds its mail there.
    """
    modes = set()
    for domain in rcpt_domains or [None]:
        policy = _domain_policy(config, domain) if domain else None
        modes.add((policy or {}).get("quarantine", config["quarantine.mode"]))
    return "mta-hold" if "mta-hold" in modes else "store"


def finalize(verdict: Verdict, facts: Facts, headers: list[tuple[str, str]], config,
             rcpt_domains: list[str] | None = None) -> Verdict:
    """Decide, for a verdict taken at end of message, what the front end does besides the action."""
    if verdict.applied == Action.REVIEW:
        verdict.quarantine = quarantine_for(config, rcpt_domains or [])
    if verdict.applied not in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD) and verdict.mode != "shadow":
        verdict.drop_rcpts = dict(facts.blocked_rcpts)
    verdict.edits = header_edits(verdict, facts, headers, config)
    verdict.learn = autolearn_label(verdict, config)
    return verdict
