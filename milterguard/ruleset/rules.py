"""Rule files: schema, loading, lint, and the compiled pattern sets.

A rule file is a YAML list.  Each entry declares one symbol::

    - symbol: SUBJ_SHOUTING
      group: headers
      weight: 1.5
      description: Subject is written in capitals
      match: {header: Subject, regex: '^[^a-z]{12,}$'}
      examples:
        hit:  ["FINAL NOTICE ACT NOW"]
        miss: ["Notes from the 3 PM call"]

An entry has `match` (a pattern rule), `expr` (a composite), or neither
(a symbol emitted by a Python check, which declares it).  An entry with
`group` and no `symbol` declares a group and its caps.

All regular expressions are RE2 (linear time, no backtracking), and all
patterns that look at the same text are matched in one pass with an
RE2 set; a pattern's own regex runs again only for the rules that hit,
to show what matched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import re2

from milterguard.model import Action, Stage
from milterguard.ruleset import composite
from milterguard.ruleset.maps import MapFile, redis_map_name
from milterguard.yamlsrc import SourceError, load_file

_UNANCHORED = re2._Anchor.UNANCHORED

SYMBOL_RE = re.compile(r"^[A-Z][A-Z0-9_]{1,63}$")
GROUP_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

# Targets a `match` can look at: the stage that first has the data, and a label.
TARGETS: dict[str, tuple[Stage, str]] = {
    "client_ip": (Stage.CONNECT, "client IP"),
    "client_name": (Stage.CONNECT, "client name"),
    "helo": (Stage.HELO, "HELO"),
    "mail_from": (Stage.MAIL_FROM, "MAIL FROM"),
    "rcpt": (Stage.RCPT, "RCPT TO"),
    "header": (Stage.HEADERS, "header"),
    "allheaders": (Stage.HEADERS, "all headers"),
    "body": (Stage.EOM, "body text"),
    "rawbody": (Stage.EOM, "raw body"),
    "uri": (Stage.EOM, "URL"),
    "uri_host": (Stage.EOM, "URL host"),
    "uri_text": (Stage.EOM, "link text"),
    "attachment_name": (Stage.EOM, "attachment name"),
    "content_type": (Stage.EOM, "MIME type"),
    "map": (Stage.CONNECT, "map"),  # the stage comes from `key`
}

# Keys a map can be looked up with, and the stage that has them.
MAP_KEYS: dict[str, Stage] = {
    "client_ip": Stage.CONNECT,
    "client_name": Stage.CONNECT,
    "helo": Stage.HELO,
    "mail_from": Stage.MAIL_FROM,
    "mail_from_domain": Stage.MAIL_FROM,
    "rcpt": Stage.RCPT,
    "rcpt_domain": Stage.RCPT,
    "from": Stage.HEADERS,
    "from_domain": Stage.HEADERS,
    "reply_to": Stage.HEADERS,
    "uri_host": Stage.EOM,
}

HEADER_PARTS = ("value", "raw", "addr", "name")
RULE_KEYS = {
    "symbol", "description", "weight", "group", "enabled", "state", "action", "match",
    "expr", "consumes", "examples", "tags",
}
MATCH_OPTION_KEYS = {"nocase", "negate"}
GROUP_KEYS = {"group", "description", "max_score", "min_score"}


@dataclass
class Rule:
    """One declared symbol."""

    symbol: str
    description: str
    weight: float
    group: str
    source: str  # file:line
    kind: str  # "match", "composite" or "check"
    stage: Stage = Stage.FINAL
    enabled: bool = True
    state: str = "stable"
    action: Action | None = None
    shipped: bool = False
    # match rules
    target: str = ""
    header: str = ""  # for target "header": the header name
    part: str = "value"  # for target "header"
    pattern: str = ""
    exists: bool | None = None
    negate: bool = False
    map: MapFile | None = None
    map_key: str = ""
    redis_map: str = ""  # the name of a map in Redis (`map: redis:NAME`), read by the engine
    regex: Any = None  # compiled RE2
    # composites
    expr: Any = None
    expr_text: str = ""
    consumes: list[str] = field(default_factory=list)
    examples_hit: list[Any] = field(default_factory=list)
    examples_miss: list[Any] = field(default_factory=list)

    @property
    def where(self) -> str:
        if self.target == "header":
            return f"header {self.header}" + ("" if self.part == "value" else f" ({self.part})")
        if self.target == "map":
            name = f"redis:{self.redis_map}" if self.redis_map else Path(self.map.path).name if self.map else "?"
            return f"map {name} by {self.map_key}"
        return TARGETS.get(self.target, (None, self.kind))[1]

    def match_text(self, text: str) -> re2._Match | None:
        """The regex match of TEXT, for explain output and examples."""
        return self.regex.search(text) if self.regex is not None else None

    def matched_text(self, data: bytes) -> str | None:
        """What the regex matches first in DATA (a value encoded as UTF-8), or None.

        The same text as `match_text(value).group(0)`, for the engine's hot path:
        the value is encoded once for all the rules that hit it, and the match is
        cut from the bytes, instead of the re2 wrapper encoding the value again and
        mapping byte offsets back to characters on every call.
        """
        if self.regex is None:
            return None
        start, end = self.regex._regexp.Match(_UNANCHORED, data, 0, len(data))[0]
        if start < 0:
            return None
        return data[start:end].decode("utf-8")

    def example_hits(self, example: Any) -> bool:
        """Whether an example value makes this rule hit (match rules only)."""
        if self.target == "map" or self.target == "client_ip":
            return self.map is not None and self.map.match_any(str(example)) is not None
        if self.exists is not None:
            present = example is not None
            return present if self.exists else not present
        if example is None:
            return self.negate
        found = self.regex.search(str(example)) is not None
        return found != self.negate


@dataclass
class GroupDef:
    name: str
    description: str = ""
    max_score: float | None = None
    min_score: float | None = None
    source: str = ""


class PatternSet:
    """Regex rules over one kind of text, matched in a single RE2 pass."""

    def __init__(self, key: tuple, rules: list[Rule]) -> None:
        self.key = key
        self.rules = rules
        options = re2.Options()
        options.max_mem = 64 << 20
        options.log_errors = False  # a fault is raised as re2.error and reported with file:line
        self._set = re2.Set.SearchSet(options)
        for rule in rules:
            self._set.Add(rule.pattern)
        self._set.Compile()
        self._negated = [i for i, r in enumerate(rules) if r.negate]
        self.has_negated = bool(self._negated)

    def matches(self, values: list[str] | list[bytes]) -> dict[int, int]:
        """Rule index -> index of the first value it matched (values as str, or as UTF-8 bytes)."""
        found: dict[int, int] = {}
        for vi, value in enumerate(values):
            for ri in self._set.Match(value) or ():
                found.setdefault(ri, vi)
        return found


@dataclass
class RuleSet:
    """Every rule of a configuration, compiled, with what lint found."""

    rules: dict[str, Rule] = field(default_factory=dict)
    groups: dict[str, GroupDef] = field(default_factory=dict)
    pattern_sets: dict[Stage, list[PatternSet]] = field(default_factory=dict)
    exists_rules: dict[Stage, list[Rule]] = field(default_factory=dict)
    list_rules: dict[Stage, list[Rule]] = field(default_factory=dict)  # client_ip lists and maps
    composites: list[Rule] = field(default_factory=list)  # in evaluation order
    files: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def active(self, symbol: str) -> bool:
        rule = self.rules.get(symbol)
        return rule is not None and rule.enabled


def default_group(path: str) -> str:
    """The group of a file's rules that name none: the file name as a group name.

    `my-rules.yaml` gives `my_rules`, `10-local.yaml` gives `local`.
    """
    name = re.sub(r"[^a-z0-9_]+", "_", Path(path).stem.lower()).lstrip("_0123456789")[:64].rstrip("_")
    return name or "local"


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


class _Loader:
    def __init__(self, share_dir: Path, maps_dirs: list[Path], redis: bool) -> None:
        self.rs = RuleSet()
        self.redis = redis  # whether Redis is configured, for maps in Redis
        self.share_dir = share_dir.resolve() if share_dir else None
        self.maps_dirs = maps_dirs
        self.map_cache: dict[str, MapFile] = {}

    def error(self, where: Any, message: str) -> None:
        self.rs.errors.append(f"{where}: {message}")

    def warn(self, where: Any, message: str) -> None:
        self.rs.warnings.append(f"{where}: {message}")

    def load_map(self, name: str, where: str, rule_dir: Path) -> MapFile | None:
        path = Path(name)
        if not path.is_absolute():
            for base in [*self.maps_dirs, rule_dir]:
                if (base / path).is_file():
                    path = base / path
                    break
            else:
                self.error(where, f"map file {name!r} not found (looked in {', '.join(map(str, self.maps_dirs))} and {rule_dir})")
                return None
        key = str(path)
        if key not in self.map_cache:
            try:
                self.map_cache[key] = MapFile.load(path)
            except SourceError as exc:
                self.error(where, str(exc))
                return None
        return self.map_cache[key]

    def load_file(self, path: str) -> None:
        self.rs.files.append(path)  # counted also when it does not parse
        try:
            located = load_file(path)
        except SourceError as exc:
            self.rs.errors.append(str(exc))
            return
        shipped = self.share_dir is not None and Path(path).resolve().is_relative_to(self.share_dir)
        if shipped:
            # Shipped rules are named as in the source tree (rules/body.yaml:12), wherever installed.
            located.file = str(Path(path).resolve().relative_to(self.share_dir))
        data = located.data
        if data is None:
            return
        if not isinstance(data, list):
            self.error(located.loc(()), "a rule file is a list of rules")
            return
        for i, entry in enumerate(data):
            where = located.loc((i,))
            if not isinstance(entry, dict):
                self.error(where, "each rule is a mapping")
                continue
            if "symbol" not in entry and "group" in entry:
                self.load_group(entry, where, located, i)
                continue
            self.load_rule(entry, where, located, i, Path(path).parent, default_group(path), shipped)

    def load_group(self, entry: dict, where, located, index: int) -> None:
        unknown = set(entry) - GROUP_KEYS
        if unknown:
            self.error(located.loc((index, sorted(unknown)[0])), f"unknown group key {sorted(unknown)[0]!r}")
            return
        name = entry["group"]
        if not isinstance(name, str) or not GROUP_RE.match(name):
            self.error(where, f"bad group name {name!r} (lower case, digits, _)")
            return
        if name in self.rs.groups and self.rs.groups[name].source:
            self.error(where, f"group {name} declared twice (first at {self.rs.groups[name].source})")
            return
        g = GroupDef(name=name, description=str(entry.get("description", "")), source=str(where))
        for cap in ("max_score", "min_score"):
            if cap in entry:
                if isinstance(entry[cap], bool) or not isinstance(entry[cap], (int, float)):
                    self.error(located.loc((index, cap)), f"{cap} must be a number")
                    return
                setattr(g, cap, float(entry[cap]))
        self.rs.groups[name] = g

    def load_rule(self, entry: dict, where, located, index: int, rule_dir: Path, default_group: str, shipped: bool) -> None:
        def at(*keys: Any) -> str:
            return str(located.loc((index, *keys)))

        unknown = sorted(set(entry) - RULE_KEYS)
        if unknown:
            self.error(at(unknown[0]), f"unknown rule key {unknown[0]!r} (known: {', '.join(sorted(RULE_KEYS))})")
            return
        symbol = entry.get("symbol")
        if not isinstance(symbol, str) or not SYMBOL_RE.match(symbol):
            self.error(at("symbol"), f"bad symbol name {symbol!r}: UPPER_SNAKE, starting with a letter")
            return
        if symbol in self.rs.rules:
            self.error(at("symbol"), f"symbol {symbol} declared twice (first at {self.rs.rules[symbol].source})")
            return
        description = entry.get("description")
        if not isinstance(description, str) or not description.strip():
            self.error(at("symbol"), f"{symbol}: a description is required")
            return
        weight = entry.get("weight", None)
        if weight is None or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            self.error(at("weight") if "weight" in entry else at("symbol"), f"{symbol}: weight must be a number")
            return
        group = entry.get("group", default_group)
        if not isinstance(group, str) or not GROUP_RE.match(group):
            self.error(at("group"), f"{symbol}: bad group name {group!r}")
            return
        enabled = entry.get("enabled", True)
        if not isinstance(enabled, bool):
            self.error(at("enabled"), f"{symbol}: enabled must be true or false")
            return
        state = entry.get("state", "stable")
        if state not in ("stable", "testing"):
            self.error(at("state"), f"{symbol}: state must be stable or testing")
            return
        action = None
        if "action" in entry:
            try:
                action = Action.parse(str(entry["action"]))
            except ValueError as exc:
                self.error(at("action"), f"{symbol}: {exc}")
                return
        if "match" in entry and "expr" in entry:
            self.error(at("expr"), f"{symbol}: a rule has either match or expr, not both")
            return
        kind = "match" if "match" in entry else "composite" if "expr" in entry else "check"
        rule = Rule(
            symbol=symbol, description=description.strip(), weight=float(weight), group=group,
            source=str(where), kind=kind, enabled=enabled, state=state, action=action, shipped=shipped,
        )
        if "consumes" in entry and kind != "composite":
            self.error(at("consumes"), f"{symbol}: only composites (expr) consume symbols")
            return
        examples = entry.get("examples")
        if examples is not None:
            if not isinstance(examples, dict) or set(examples) - {"hit", "miss"}:
                self.error(at("examples"), f"{symbol}: examples is a mapping with hit and miss lists")
                return
            rule.examples_hit = _as_list(examples.get("hit"))
            rule.examples_miss = _as_list(examples.get("miss"))
        if kind == "match":
            if not self.compile_match(rule, entry["match"], at, rule_dir):
                return
            if rule.redis_map:
                if rule.examples_hit or rule.examples_miss:  # the entries are in Redis, not here
                    self.warn(at("examples"), f"{symbol}: the examples of a map in Redis are not checked")
            elif not (rule.examples_hit and rule.examples_miss):
                if shipped:
                    self.error(at("symbol"), f"{symbol}: a shipped match rule needs hit and miss examples")
                    return
                self.warn(at("symbol"), f"{symbol}: no hit and miss examples")
        elif kind == "composite":
            text = entry["expr"]
            if not isinstance(text, str):
                self.error(at("expr"), f"{symbol}: expr must be a string")
                return
            try:
                rule.expr = composite.parse(text)
            except composite.ExprError as exc:
                self.error(at("expr"), f"{symbol}: bad expression: {exc}")
                return
            rule.expr_text = text
            rule.consumes = [str(s) for s in _as_list(entry.get("consumes"))]
            rule.stage = Stage.FINAL
        self.rs.rules[symbol] = rule

    def compile_match(self, rule: Rule, spec: Any, at, rule_dir: Path) -> bool:
        sym = rule.symbol
        if isinstance(spec, str):
            self.error(at("match"), f"{sym}: match is a mapping such as {{body: 'regex'}}")
            return False
        if not isinstance(spec, dict):
            self.error(at("match"), f"{sym}: match must be a mapping")
            return False
        targets = [k for k in spec if k in TARGETS]
        if len(targets) != 1:
            self.error(at("match"), f"{sym}: match names exactly one of: {', '.join(TARGETS)}")
            return False
        target = targets[0]
        rule.target = target
        rule.stage = TARGETS[target][0]
        allowed = {target} | MATCH_OPTION_KEYS
        if target == "header":
            allowed |= {"regex", "exists", "part", "contains"}
        if target == "map":
            allowed |= {"key"}
        extra = sorted(set(spec) - allowed)
        if extra:
            self.error(at("match", extra[0]), f"{sym}: {extra[0]!r} does not go with {target}")
            return False
        nocase = spec.get("nocase", False)
        rule.negate = spec.get("negate", False)
        if not isinstance(nocase, bool) or not isinstance(rule.negate, bool):
            self.error(at("match"), f"{sym}: nocase and negate are true or false")
            return False
        pattern: Any = spec[target]
        if target == "header":
            if not isinstance(pattern, str) or not re.match(r"^[!-9;-~]+$", pattern):
                self.error(at("match", "header"), f"{sym}: header must be a header name")
                return False
            rule.header = pattern
            rule.part = spec.get("part", "value")
            if rule.part not in HEADER_PARTS:
                self.error(at("match", "part"), f"{sym}: part must be one of {', '.join(HEADER_PARTS)}")
                return False
            kinds = [k for k in ("regex", "exists", "contains") if k in spec]
            if len(kinds) != 1:
                self.error(at("match"), f"{sym}: a header match needs one of regex, exists, contains")
                return False
            if "exists" in spec:
                if not isinstance(spec["exists"], bool) or rule.negate:
                    self.error(at("match", "exists"), f"{sym}: exists is true or false (and takes no negate)")
                    return False
                rule.exists = spec["exists"]
                return True
            pattern = spec["regex"] if "regex" in spec else re2.escape(str(spec["contains"]))
        elif target in ("client_ip", "map"):
            if target == "map":
                key = spec.get("key")
                if key not in MAP_KEYS:
                    self.error(at("match", "key"), f"{sym}: a map needs key: one of {', '.join(MAP_KEYS)}")
                    return False
                rule.map_key = key
                rule.stage = MAP_KEYS[key]
                if not isinstance(pattern, str):
                    self.error(at("match", "map"), f"{sym}: map is a file name or redis:NAME")
                    return False
                try:
                    rule.redis_map = redis_map_name(pattern) or ""
                except ValueError as exc:
                    self.error(at("match", "map"), f"{sym}: {exc}")
                    return False
                if rule.redis_map:
                    if not self.redis:
                        self.error(at("match", "map"), f"{sym}: map {pattern} is in Redis, but no Redis is "
                                   "configured (redis.url, redis.replicas or redis.sentinels)")
                    return self.redis
                rule.map = self.load_map(pattern, at("match", "map"), rule_dir)
                return rule.map is not None
            entries = _as_list(pattern)
            try:
                rule.map = MapFile.parse("\n".join(str(e) for e in entries), f"{at('match', 'client_ip')}")
            except SourceError as exc:
                self.error(at("match", "client_ip"), f"{sym}: {exc.message}")
                return False
            rule.map_key = "client_ip"
            return True
        if not isinstance(pattern, str) or not pattern:
            self.error(at("match", target), f"{sym}: the pattern must be a non-empty string")
            return False
        if nocase:
            pattern = "(?i)" + pattern
        try:
            options = re2.Options()
            options.max_mem = 8 << 20
            options.log_errors = False  # RE2 would also log the fault on stderr, without file:line
            rule.regex = re2.compile(pattern, options)
        except re2.error as exc:
            reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            self.error(at("match"), f"{sym}: regex not accepted by RE2 (no lookaround or backreferences): {reason}")
            return False
        rule.pattern = pattern
        return True


def load_rules(
    files: Iterable[str],
    *,
    share_dir: Path | None = None,
    maps_dirs: Iterable[Path] = (),
    overrides: dict[str, dict] | None = None,
    group_caps: dict[str, dict] | None = None,
    check_symbols: dict[str, str] | None = None,
    redis: bool = False,
) -> RuleSet:
    """Load rule files, apply configuration overrides, and compile.

    `check_symbols` maps every symbol a Python check declares to that
    check's name, so that both sides can be cross-checked.  Errors are
    collected in `RuleSet.errors` rather than raised, so that `lint` can
    report them all.  `redis` says whether Redis is configured, which maps in Redis need.
    """
    loader = _Loader(share_dir or Path("/nonexistent"), [Path(p) for p in maps_dirs], redis)
    for path in files:
        loader.load_file(str(path))
    rs = loader.rs
    for symbol, change in (overrides or {}).items():
        rule = rs.rules.get(symbol)
        if rule is None:
            loader.error("symbols", f"override for unknown symbol {symbol}")
            continue
        for key, value in change.items():
            if key == "action":
                rule.action = Action.parse(value)
            else:
                setattr(rule, key, value)
    for name, caps in (group_caps or {}).items():
        g = rs.groups.setdefault(name, GroupDef(name=name, source="configuration"))
        for key, value in caps.items():
            setattr(g, key, value)
    for rule in rs.rules.values():
        rs.groups.setdefault(rule.group, GroupDef(name=rule.group))
    checks = check_symbols or {}
    for symbol, check in checks.items():
        if symbol not in rs.rules:
            loader.error(f"check {check}", f"emits {symbol}, which no rule file declares (its weight lives there)")
    for rule in rs.rules.values():
        if rule.kind == "check" and rule.symbol not in checks and check_symbols is not None:
            loader.error(rule.source, f"{rule.symbol} has no match or expr and no check emits it")
    _link_composites(loader)
    _compile_sets(rs, loader)
    return rs


def _link_composites(loader: _Loader) -> None:
    rs = loader.rs
    comps = {s: r for s, r in rs.rules.items() if r.kind == "composite"}
    for rule in comps.values():
        for name in composite.symbols(rule.expr) | set(rule.consumes):
            if name not in rs.rules:
                loader.error(rule.source, f"{rule.symbol}: unknown symbol {name} in expr or consumes")
        for name in composite.groups(rule.expr):
            if name not in rs.groups:
                loader.error(rule.source, f"{rule.symbol}: unknown group {name}")
    # Order composites so that one that names another comes after it (and no cycles).
    order: list[Rule] = []
    state: dict[str, int] = {}

    def visit(symbol: str, chain: list[str]) -> None:
        if state.get(symbol) == 2:
            return
        if state.get(symbol) == 1:
            loader.error(comps[symbol].source, f"composite loop: {' -> '.join(chain + [symbol])}")
            return
        state[symbol] = 1
        for dep in composite.symbols(comps[symbol].expr):
            if dep in comps:
                visit(dep, chain + [symbol])
        state[symbol] = 2
        order.append(comps[symbol])

    for symbol in comps:
        visit(symbol, [])
    rs.composites = order


def _compile_sets(rs: RuleSet, loader: _Loader) -> None:
    buckets: dict[tuple, list[Rule]] = {}
    for rule in rs.rules.values():
        if rule.kind != "match" or not rule.enabled:
            continue
        if rule.exists is not None:
            rs.exists_rules.setdefault(rule.stage, []).append(rule)
        elif rule.map is not None or rule.redis_map:
            rs.list_rules.setdefault(rule.stage, []).append(rule)
        else:
            key = (rule.stage, rule.target, rule.header.lower(), rule.part)
            buckets.setdefault(key, []).append(rule)
    for key, rules in buckets.items():
        try:
            rs.pattern_sets.setdefault(key[0], []).append(PatternSet(key[1:], rules))
        except re2.error as exc:  # pragma: no cover - each pattern compiled alone above
            loader.error(rules[0].source, f"pattern set for {key[1]} does not compile: {exc}")
