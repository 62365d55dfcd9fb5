"""The types of settings: each parses and checks a value, with a message that names
what was expected.  milterguard/settings.py declares the settings with them.
"""

from __future__ import annotations

import os
import re
from typing import Any


class Type:
    """A setting's type: validates a value read from YAML or from --set."""

    name = "value"

    def __call__(self, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def from_text(self, text: str) -> Any:
        """Convert a --set string; YAML rules (numbers, true/false, lists)."""
        import yaml

        try:
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        return self(value)


class Str(Type):
    name = "string"

    def __call__(self, value: Any) -> str:
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return str(value)

    def from_text(self, text: str) -> str:
        return text


_HOST_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                      r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


def parse_clamd_address(text: str) -> tuple[str, int | None]:
    """A clamd address: (socket path, None) for `/path` or `unix:/path`, (host, port) for
    `HOST:PORT` or `[V6]:PORT` (an empty HOST is 127.0.0.1).  ValueError for anything else."""
    import ipaddress

    address = text.strip()
    path = address[5:] if address.startswith("unix:") else address
    if path.startswith("/"):
        return path, None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, [IPv6]:PORT, /socket/path or unix:/socket/path, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address in brackets") from None
    elif host and not _HOST_RE.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or IPv4 address (an IPv6 address goes in brackets), in {text!r}")
    return host or "127.0.0.1", int(port)


class ClamdAddress(Str):
    name = "clamd address"

    def __call__(self, value: Any) -> str:
        value = super().__call__(value)
        if value.strip():
            parse_clamd_address(value)
        return value

    def from_text(self, text: str) -> str:
        return self(text)


def parse_listen_address(text: str) -> tuple[str, int]:
    """`ADDRESS:PORT` (an IPv6 address in brackets) into (address, port); IP addresses only, so that
    binding never asks a resolver.  ValueError for anything else."""
    import ipaddress

    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected ADDRESS:PORT, like 127.0.0.1:11381 or [::1]:11381, got {text!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (an IPv6 address goes in brackets), in {text!r}") from None
    if address.version == 6 and not bracketed:
        raise ValueError(f"write an IPv6 address in brackets, like [::1]:11381, not {text!r}")
    return str(address), int(port)


class ListenAddress(Str):
    """`ADDRESS:PORT` to listen on, or empty for off."""

    name = "listen address"

    def __call__(self, value: Any) -> str:
        value = super().__call__(value).strip()
        if value:
            parse_listen_address(value)
        return value

    def from_text(self, text: str) -> str:
        return self(text)


class FileMode(Type):
    """Permission bits written in octal, as chmod takes them: '0660', '660', '0o660'."""

    name = "octal mode"

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str):
            # YAML reads 0660 unquoted as 432 and 660 as 660: neither can be trusted.
            raise ValueError(f"write the mode as a quoted octal string, such as '0660', not {value!r}")
        digits = value.strip().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{3,4}", digits) or int(digits, 8) > 0o777:
            raise ValueError(f"expected permission bits in octal, 000 to 0777, such as '0660', got {value!r}")
        return value.strip()

    def from_text(self, text: str) -> str:
        return self(text)


class Directory(Str):
    """The path of a directory that exists; empty for none."""

    name = "directory"

    def __call__(self, value: Any) -> str:
        value = super().__call__(value)
        if value and not os.path.isdir(value):
            raise ValueError(f"{value!r} is not a directory" if os.path.exists(value) else f"no directory {value!r}")
        return value

    def from_text(self, text: str) -> str:
        return self(text)


class Int(Type):
    name = "integer"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum}")
        return value


class Float(Type):
    name = "number"

    def __init__(self, minimum: float | None = None) -> None:
        self.minimum = minimum

    def __call__(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}")
        return float(value)


class Seconds(Float):
    name = "seconds"

    def __init__(self) -> None:
        super().__init__(minimum=0.0)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*$", re.I)


class Size(Type):
    name = "size"

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected a size, got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must not be negative")
            return value
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"expected a size like 512K or 10M, got {value!r}")
        unit = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
        return int(float(m.group(1)) * unit)


class Bool(Type):
    name = "boolean"

    def __call__(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value


class Choice(Type):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.name = "one of " + ", ".join(choices)

    def __call__(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, got {value!r}")
        return value

    def from_text(self, text: str) -> str:
        return self(text)


class ListOf(Type):
    def __init__(self, item: Type) -> None:
        self.item = item
        self.name = f"list of {item.name}"

    def __call__(self, value: Any) -> list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(self.item(item))
            except ValueError as exc:
                raise ValueError(f"item {i + 1}: {exc}") from None
        return out

    def from_text(self, text: str) -> list:
        # `--set rules.files=a.yaml,b.yaml` as well as YAML flow lists.
        if text.startswith("["):
            return super().from_text(text)
        return self([self.item.from_text(t.strip()) for t in text.split(",") if t.strip()])


class Struct(Type):
    """A mapping with a fixed set of typed keys (for entries of a MapOf)."""

    def __init__(self, name: str, **fields: Type) -> None:
        self.name = name
        self.fields = fields

    def __call__(self, value: Any) -> dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping ({self.name}), got {value!r}")
        out = {}
        for key, item in value.items():
            if key not in self.fields:
                raise ValueError(f"unknown key {key!r} (known: {', '.join(self.fields)})")
            try:
                out[key] = self.fields[key](item)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return out


class MapOf(Type):
    """A mapping from free keys (symbol names, domains) to typed values."""

    def __init__(self, value: Type, key_pattern: str | None = None, key_doc: str = "key") -> None:
        self.value = value
        self.key_re = re.compile(key_pattern) if key_pattern else None
        self.key_doc = key_doc
        self.name = f"mapping of {key_doc} to {value.name}"

    def __call__(self, value: Any) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        out = {}
        for key, item in value.items():
            key = str(key)
            if self.key_re and not self.key_re.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid {self.key_doc}")
            try:
                out[key] = self.value(item)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return out
