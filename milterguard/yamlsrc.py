"""YAML loading that remembers where each value came from.

Both the configuration and the rule files need `file:line` in their
error messages, so every mapping key and sequence item is returned with the
line it was written on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# libyaml's parser where PyYAML was built with it: it reads the shipped rules about
# five times faster, and its nodes carry their line as the pure-Python parser's do.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SourceError(ValueError):
    """An error in a configuration or rule file, with its place."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


@dataclass(frozen=True)
class Loc:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class Located:
    """Parsed YAML plus a map from key path to the line that set it."""

    def __init__(self, data: Any, lines: dict[tuple, int], file: str) -> None:
        self.data = data
        self.lines = lines
        self.file = file

    def loc(self, path: tuple) -> Loc:
        """The place of PATH, or of its nearest written ancestor."""
        while path:
            if path in self.lines:
                return Loc(self.file, self.lines[path])
            path = path[:-1]
        return Loc(self.file, self.lines.get((), 1))


def _walk(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, lines: dict[tuple, int], file: str) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                raise SourceError(f"{file}:{key_node.start_mark.line + 1}", "mapping keys must be scalars")
            if key in out:
                raise SourceError(f"{file}:{key_node.start_mark.line + 1}", f"duplicate key {key!r}")
            sub = path + (key,)
            lines[sub] = key_node.start_mark.line + 1
            out[key] = _walk(loader, value_node, sub, lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, path + (i,), lines, file) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_text(text: str, file: str = "<string>") -> Located:
    """Parse one YAML document; raise SourceError with file:line on a syntax error."""
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        data = None if node is None else _walk(loader, node, (), lines, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # A fault found at the end of the text (an unclosed bracket) is on its last line.
        line = max(1, min(mark.line + 1, len(text.splitlines()))) if mark else 1
        raise SourceError(f"{file}:{line}", f"YAML syntax error: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise SourceError(file, f"YAML error: {exc}") from None
    finally:
        loader.dispose()
    return Located(data, lines, file)


def load_file(path: str | Path) -> Located:
    """Read and parse a YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(str(path), f"not UTF-8: {exc}") from None
    except OSError as exc:
        raise SourceError(str(path), f"cannot read: {exc.strerror}") from None
    return load_text(text, str(path))
