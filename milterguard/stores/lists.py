"""Allow and block lists: map files under `lists.dir` that reload when they change.

Layout (each file a map, see milterguard/ruleset/maps.py: one entry a line,
an email address, a domain with its subdomains, an IP address or a CIDR)::

    {lists.dir}/allow.map              global
    {lists.dir}/block.map
    {lists.dir}/example.org/allow.map  for recipients at example.org (and its subdomains)
    {lists.dir}/example.org/block.map

A file is read again when its modification time or size changes (looked at
most every `lists.check_interval` seconds); a file that no longer parses
keeps its previous entries and is logged once.  `milterguard list` edits
the files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from milterguard.ruleset.maps import MapFile
from milterguard.yamlsrc import SourceError

log = logging.getLogger("milterguard.lists")

KINDS = ("allow", "block")
GLOBAL = ""  # the domain key of the global lists


def list_path(base: Path, kind: str, domain: str = GLOBAL) -> Path:
    if kind not in KINDS:
        raise ValueError(f"list kind is allow or block, got {kind!r}")
    return (base / domain.lower().strip(".") / f"{kind}.map") if domain else base / f"{kind}.map"


class ListStore:
    """The lists of one directory, reloaded on change."""

    def __init__(self, base: str | Path, check_interval: float = 1.0) -> None:
        self.base = Path(base)
        self.check_interval = check_interval
        self._maps: dict[tuple[str, str], MapFile] = {}
        self._stamps: dict[tuple[str, str], tuple[float, int]] = {}
        self._checked = 0.0
        self._lock = threading.Lock()

    def _files(self) -> dict[tuple[str, str], Path]:
        found: dict[tuple[str, str], Path] = {}
        try:
            entries = list(os.scandir(self.base))
        except OSError:
            return found
        for entry in entries:
            if entry.is_file() and entry.name in ("allow.map", "block.map"):
                found[(GLOBAL, entry.name[:-4])] = Path(entry.path)
            elif entry.is_dir():
                for kind in KINDS:
                    path = Path(entry.path) / f"{kind}.map"
                    if path.is_file():
                        found[(entry.name.lower(), kind)] = path
        return found

    def refresh(self, force: bool = False) -> None:
        """Reload the files that changed since the last look (at most every check_interval)."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval:
            return
        with self._lock:
            self._checked = now
            files = self._files()
            for key in list(self._maps):
                if key not in files:
                    del self._maps[key]
                    self._stamps.pop(key, None)
            for key, path in files.items():
                try:
                    st = path.stat()
                except OSError:
                    continue
                stamp = (st.st_mtime, st.st_size)
                if self._stamps.get(key) == stamp:
                    continue
                self._stamps[key] = stamp
                try:
                    self._maps[key] = MapFile.load(path)
                except SourceError as exc:
                    log.error("list %s not reloaded, keeping its previous entries: %s", path, exc)

    def lookup(self, kind: str, domain: str, value: str, is_ip: bool = False) -> str | None:
        """The entry of list KIND (of DOMAIN's lists, or the global ones for "") matching VALUE."""
        self.refresh()
        if not self._maps:
            return None  # no list at all (the usual case for most checks' look-ups)
        domain = domain.lower()
        keys = [(GLOBAL, kind)] if domain == GLOBAL else []
        if domain:
            # example.org's lists also serve sub.example.org.
            parts = domain.split(".")
            keys = [(".".join(parts[i:]), kind) for i in range(len(parts) - 1)]
        for key in keys:
            m = self._maps.get(key)
            if m is None:
                continue
            entry = m.match_ip(value) if is_ip else m.match_any(value)
            if entry is not None:
                return entry
        return None

    def domains(self) -> list[str]:
        self.refresh(force=True)
        return sorted({d for d, _ in self._maps if d})


_STORES: dict[tuple[str, float], ListStore] = {}


def store_for(config) -> ListStore | None:
    """The per-process ListStore of CONFIG's lists.dir, or None when it is empty."""
    base = config["lists.dir"]
    if not base:
        return None
    # Several checks ask per message: the expanded path is worked out once per setting.
    setting = (base, config.etc_dir, config.share_dir, config["lists.check_interval"])
    key = _KEYS.get(setting)
    if key is None:
        key = _KEYS[setting] = (config.expand(base), setting[3])
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = ListStore(*key)
    return store


_KEYS: dict[tuple, tuple[str, float]] = {}


# ------------------------------------------------------------------ editing (the `list` command)


def read_entries(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def add_entries(path: Path, entries: list[str]) -> list[str]:
    """Append ENTRIES not yet in the file (validated as map entries); return those added."""
    MapFile.parse("\n".join(entries), "<command line>")  # raises SourceError on a bad entry
    present = {e.lower() for e in read_entries(path)}
    added = [e for e in dict.fromkeys(entries) if e.lower() not in present]
    if added:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        _replace(path, text + "".join(f"{e}\n" for e in added))
    return added


def remove_entries(path: Path, entries: list[str]) -> list[str]:
    """Remove the lines holding ENTRIES (comments elsewhere stay); return those removed."""
    wanted = {e.lower() for e in entries}
    if not path.exists():
        return []
    kept, removed = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        entry = line.split("#", 1)[0].strip()
        if entry and entry.lower() in wanted:
            removed.append(entry)
        else:
            kept.append(line)
    if removed:
        _replace(path, "".join(kept))
    return removed


def _replace(path: Path, text: str) -> None:
    # Write a new file and rename it over the old one: a filter reading the list
    # at that moment sees either version whole.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
