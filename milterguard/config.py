"""Layered configuration.

The order is fixed, each layer over the one before:

1. the declared defaults (milterguard.settings), which
   `{share}/conf/milterguard.yaml` spells out for reading;
2. `{etc}/milterguard.yaml`, then `{etc}/local.d/*.yaml` in name order:
   deep-merged into what came before;
3. `{etc}/override.d/*.yaml` in name order: each top-level section named
   there replaces that whole section;
4. files named by the environment variable MILTERGUARD_CONFIG (several
   separated by ":"), then files given with `--config`: deep-merged;
5. `--set KEY=VALUE` flags.

There is no search path where the first file found wins.  An unknown key
or a value of the wrong type stops with the file and line.
"""

from __future__ import annotations

import copy
import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from milterguard import settings as S
from milterguard.yamlsrc import SourceError, load_file

DEFAULT_ETC = "/etc/milterguard"


def find_share_dir() -> Path:
    """The directory holding the shipped `rules/` and `conf/`.

    A source checkout (the package next to `rules/`) comes first, so that
    tests and `python -m milterguard` from a checkout use its own rules; then
    the data directory of the installation prefix; then /usr/share.
    """
    here = Path(__file__).resolve().parent.parent
    candidates = [
        here,
        Path(sys.prefix) / "share" / "milterguard",
        Path("/usr/local/share/milterguard"),
        Path("/usr/share/milterguard"),
    ]
    for cand in candidates:
        if (cand / "rules").is_dir() and (cand / "conf").is_dir():
            return cand
    return candidates[-1]


class ConfigError(SourceError):
    """A configuration error; its text names the file and line."""


@dataclass
class Config:
    """The merged configuration: a value and an origin for every setting."""

    values: dict[str, Any]
    origins: dict[str, str]
    etc_dir: Path
    share_dir: Path
    files: list[str] = field(default_factory=list)
    # For mappings merged key by key (thresholds, symbols...): the origin of each value
    # inside, by its path; a path not listed has the origin of its nearest listed parent,
    # or the setting's own.
    part_origins: dict[str, dict[tuple, str]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def expand(self, text: str) -> str:
        """Replace {share} and {etc} in a path setting."""
        return text.replace("{share}", str(self.share_dir)).replace("{etc}", str(self.etc_dir))

    def paths(self, key: str) -> list[str]:
        """The files matched by a list of glob patterns, in order, each once."""
        out: list[str] = []
        for pattern in self.values[key]:
            for name in sorted(glob.glob(self.expand(pattern))):
                if name not in out:
                    out.append(name)
        return out

    @property
    def workers(self) -> int:
        return self.values["milter.workers"] or S.default_workers()

    def origin(self, key: str, path: tuple = ()) -> str:
        """Where the value at PATH inside setting KEY was set."""
        parts = self.part_origins.get(key, {})
        while path:
            if path in parts:
                return parts[path]
            path = path[:-1]
        return parts.get((), self.origins[key])

    def set_part_origins(self, key: str, value: Any, where, path: tuple = ()) -> None:
        """Record the origin of each value that VALUE, merged into setting KEY at PATH, sets.

        WHERE gives the origin of a path inside VALUE (a function), or is one origin for all.
        """
        parts = self.part_origins.setdefault(key, {})
        if isinstance(value, dict) and value:
            for sub, item in value.items():
                self.set_part_origins(key, item, where, path + (str(sub),))
            return
        # A value that is not a mapping replaces whatever was there, with its parts.
        for old in [p for p in parts if p[: len(path)] == path]:
            del parts[old]
        parts[path] = where(path) if callable(where) else where

    def with_sets(self, sets: Iterable[str]) -> "Config":
        """A copy with more --set flags applied."""
        new = Config(copy.deepcopy(self.values), dict(self.origins), self.etc_dir, self.share_dir, list(self.files),
                     {k: dict(v) for k, v in self.part_origins.items()})
        for item in sets:
            _apply_set(new, item)
        return new


def _flatten(data: Any, located, file: str, path: tuple = ()) -> dict[str, tuple[Any, str, tuple]]:
    """Turn nested sections into {dotted key: (value, "file:line", path in the file)}."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        where = located.loc(path)
        raise ConfigError(str(where), "expected a mapping of settings")
    out: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        sub = path + (key,)
        dotted = ".".join(str(p) for p in sub)
        where = str(located.loc(sub))
        if dotted in S.BY_KEY:
            out[dotted] = (value, where, sub)
        elif any(k.startswith(dotted + ".") for k in S.BY_KEY):
            out.update(_flatten(value, located, file, sub))
        else:
            parent = ".".join(str(p) for p in path)
            known = sorted(k[len(parent) + 1:].split(".")[0] for k in S.BY_KEY if not parent or k.startswith(parent + "."))
            raise ConfigError(where, f"unknown setting {dotted!r}" + (f" (known here: {', '.join(sorted(set(known)))})" if known else ""))
    return out


def _deep_merge(base: Any, new: Any) -> Any:
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for key, value in new.items():
            out[key] = _deep_merge(base.get(key), value) if key in base else value
        return out
    return new


def _validate(key: str, value: Any, where: str) -> Any:
    setting = S.BY_KEY[key]
    try:
        return setting.type(value)
    except ValueError as exc:
        raise ConfigError(where, f"{key}: {exc}") from None


def _apply_set(cfg: Config, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
    setting = S.BY_KEY.get(key)
    if setting is None:
        # --set symbols.FOO.weight=2 and thresholds.reject=12 address inside mappings.
        for parent in sorted(S.BY_KEY, key=len, reverse=True):
            if key.startswith(parent + "."):
                rest = key[len(parent) + 1:].split(".")
                import yaml

                try:
                    leaf: Any = yaml.safe_load(text) if text.strip() else text
                except yaml.YAMLError:
                    leaf = text
                for part in reversed(rest):
                    leaf = {part: leaf}
                merged = _deep_merge(cfg.values[parent], leaf)
                cfg.values[parent] = _validate(parent, merged, f"--set {key}")
                cfg.origins[parent] = f"--set {key}"
                cfg.set_part_origins(parent, leaf, f"--set {key}")
                return
        raise ConfigError("--set", f"unknown setting {key!r}")
    try:
        value = setting.type.from_text(text)
    except ValueError as exc:
        raise ConfigError("--set", f"{key}: {exc}") from None
    cfg.values[key] = value
    cfg.origins[key] = "--set"
    cfg.part_origins.pop(key, None)


def load_config(
    etc_dir: str | Path | None = None,
    config_files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    share_dir: str | Path | None = None,
) -> Config:
    """Build the configuration from its layers (see the module docstring)."""
    etc = Path(etc_dir or os.environ.get("MILTERGUARD_ETC_DIR") or DEFAULT_ETC)
    share = Path(share_dir) if share_dir else find_share_dir()
    values = {s.key: copy.deepcopy(s.default) for s in S.SETTINGS}
    origins = {s.key: "default" for s in S.SETTINGS}
    cfg = Config(values, origins, etc, share)

    def merge_file(path: str | Path, replace_sections: bool) -> None:
        located = load_file(path)
        flat = _flatten(located.data, located, str(path))
        if replace_sections:
            for section in {k.split(".")[0] for k in flat}:
                for key in S.BY_KEY:
                    if key == section or key.startswith(section + "."):
                        cfg.values[key] = copy.deepcopy(S.BY_KEY[key].default)
                        cfg.origins[key] = f"default (section replaced by {path})"
                        cfg.part_origins.pop(key, None)
        for key, (value, where, at) in flat.items():
            checked = _validate(key, value, where)
            if S.BY_KEY[key].merge:
                if not replace_sections:
                    checked = _validate(key, _deep_merge(cfg.values[key], checked), where)
                cfg.set_part_origins(key, value, lambda sub: str(located.loc(at + sub)))
            cfg.values[key] = checked
            cfg.origins[key] = where
        cfg.files.append(str(path))

    shipped = share / "conf" / "milterguard.yaml"
    if shipped.is_file():
        merge_file(shipped, False)
    main = etc / "milterguard.yaml"
    if main.is_file():
        merge_file(main, False)
    for path in sorted(glob.glob(str(etc / "local.d" / "*.yaml"))):
        merge_file(path, False)
    for path in sorted(glob.glob(str(etc / "override.d" / "*.yaml"))):
        merge_file(path, True)
    for path in [p for p in os.environ.get("MILTERGUARD_CONFIG", "").split(os.pathsep) if p]:
        if not Path(path).is_file():
            raise ConfigError(str(path), "configuration file named by MILTERGUARD_CONFIG does not exist")
        merge_file(path, False)
    for path in config_files:
        if not Path(path).is_file():
            raise ConfigError(str(path), "configuration file given on the command line does not exist")
        merge_file(path, False)
    for item in sets:
        _apply_set(cfg, item)
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: Config) -> None:
    th = cfg.values["thresholds"]
    policies = [("thresholds", th)] + [
        (f"domains.{d}.thresholds", {**th, **p["thresholds"]})
        for d, p in cfg.values["domains"].items()
        if "thresholds" in p
    ]
    for name, t in policies:
        if not t.get("tag", 0) <= t.get("review", 0) <= t.get("reject", 0):
            raise ConfigError(cfg.origins.get("thresholds", ""), f"{name}: expected tag <= review <= reject, got {t}")
    if cfg.values["lists.backend"] == "redis" and not S.redis_configured(cfg.values):
        raise ConfigError(cfg.origins.get("lists.backend", ""),
                          "lists.backend is redis, but no Redis is configured (redis.url, redis.replicas or redis.sentinels)")


def dump(cfg: Config, origin: bool = False) -> str:
    """The effective configuration as YAML, optionally with each value's origin."""
    import yaml

    def line(name: str, value: Any) -> str:
        text = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()
        return text[1:-1] if text.startswith("{") and text.endswith("}") else text

    def origins(key: str, path: tuple, value: Any) -> set[str]:
        if isinstance(value, dict) and value:
            return set().union(*(origins(key, path + (str(k),), v) for k, v in value.items()))
        return {cfg.origin(key, path)}

    def pieces(key: str, path: tuple, value: Any) -> Iterable[str]:
        """Lines for VALUE at PATH of setting KEY: one per part with an origin of its own."""
        found = origins(key, path, value)
        if len(found) > 1:
            for sub in sorted(value, key=str):
                yield from pieces(key, path + (str(sub),), value[sub])
        else:
            yield f"{line('.'.join((key,) + path), value)}    # {found.pop()}"

    lines: list[str] = []
    for setting in S.SETTINGS:
        value = cfg.values[setting.key]
        if origin:
            lines += pieces(setting.key, (), value)
        else:
            lines.append(line(setting.key, value))
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The configuration reference page, generated from the declarations."""
    import yaml

    out = [
        "# Configuration reference",
        "",
        "Generated by `milterguard config doc` from `milterguard/settings.py`; do not edit by hand.",
        "",
        "Files are read in this order, each layer over the one before: the shipped defaults",
        "(`/usr/share/milterguard/conf/milterguard.yaml`), `/etc/milterguard/milterguard.yaml`,",
        "`/etc/milterguard/local.d/*.yaml` (deep-merged), `/etc/milterguard/override.d/*.yaml`",
        "(each section named there replaces the whole section), files given with `--config`,",
        "and last `--set KEY=VALUE` flags. `milterguard config dump --origin` shows where each value came from.",
        "",
    ]
    section = None
    for s in S.SETTINGS:
        head = s.key.split(".")[0]
        if head != section:
            section = head
            out += [f"## {head}", ""]
        default = yaml.safe_dump(s.default, default_flow_style=True, width=10_000).strip()
        if default.endswith("\n..."):
            default = default[:-4].strip()
        default = default.removesuffix("...").strip()
        out += [
            f"### `{s.key}`",
            "",
            f"Type: {s.type.name}. Default: `{default}`. Since {s.since}.",
            "",
            s.doc,
            "",
        ]
    return "\n".join(out)


def default_yaml() -> str:
    """conf/milterguard.yaml: every setting at its default, documented."""
    import textwrap

    import yaml

    out = [
        "# milterguard default configuration, shipped with the package and replaced on upgrade.",
        "# Do not edit: put changes in /etc/milterguard/local.d/*.yaml (merged) or",
        "# /etc/milterguard/override.d/*.yaml (replaces whole sections).",
        "# Generated by `milterguard config defaults`.",
        "",
    ]
    tree: dict[str, Any] = {}
    docs: dict[str, str] = {}
    for s in S.SETTINGS:
        parts = s.key.split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = s.default
        docs[s.key] = s.doc

    def emit(node: dict, prefix: str, indent: int) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            pad = " " * indent
            if dotted in docs:
                for line in textwrap.wrap(docs[dotted], 90 - indent):
                    out.append(f"{pad}# {line}")
                text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()
                out.append(pad + text[1:-1] if text.startswith("{") else pad + text)
            else:
                out.append(f"{pad}{key}:")
                emit(value, dotted + ".", indent + 2)
            if indent == 0:
                out.append("")

    emit(tree, "", 0)
    return "\n".join(out).rstrip() + "\n"
