"""``milterguard serve`` as a child process, with its own etc directory.

Contract of the command (see ``milterguard serve --help``)::

    python -m milterguard serve --socket inet:PORT@HOST|unix:PATH [--workers N]
        [--etc-dir DIR] [--config FILE] [--set KEY=VALUE]...

It logs to stderr, one line per message containing ``verdict {json}``;
SIGHUP reloads the configuration, SIGTERM drains and exits.

The etc directory (``workdir/etc``) that serve reads::

    milterguard.yaml       optional main file
    local.d/*.yaml         deep-merged (config_text goes to local.d/test.yaml)
    override.d/*.yaml      replace whole sections
    rules.d/*.yaml         local rule files (rules={name: text})
    maps/                  list files (write_map())

Usage::

    mg = MilterguardProcess(tmp_path / "mg", sets={"thresholds.reject": "12"})
    mg.start()
    ...
    v = mg.verdict_for("<id@example.com>", timeout=10)
    assert "SUBJ_SHOUTING" in v.symbols
    mg.stop()
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Iterable, Mapping

from . import MilterProcess, SupportError, wait_until

__all__ = ["MilterguardProcess", "Verdict", "parse_verdicts"]

_VERDICT = re.compile(r"\bverdict\s+(?=\{)")
_DECODER = json.JSONDecoder()


class Verdict(dict):
    """One logged verdict: a dict with attribute access.

    Keys: queue_id, message_id, client, helo, from, rcpts, score, action,
    applied, symbols, elapsed_ms.  ``v.from_`` reads ``"from"``;
    ``v.symbols`` is always a list of symbol names (if serve logs symbol
    objects, their ``name``/``symbol`` is taken; the raw list stays in
    ``v["symbols"]``); ``v.line`` is the log line it came from.
    """

    line: str = ""

    def __getattr__(self, name: str):
        key = "from" if name == "from_" else name
        if key == "symbols":
            return symbol_names(self.get("symbols"))
        try:
            return self[key]
        except KeyError:
            raise AttributeError(name) from None

    def has(self, symbol: str) -> bool:
        return symbol in self.symbols


def symbol_names(raw) -> list[str]:
    if not raw:
        return []
    if isinstance(raw, Mapping):
        return list(raw.keys())
    names = []
    for item in raw:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, Mapping):
            names.append(str(item.get("name") or item.get("symbol")))
        else:
            names.append(str(item))
    return names


def parse_verdicts(text: str) -> list[Verdict]:
    """Every ``verdict {json}`` found in *text*, one per log line, in order."""
    out = []
    for line in text.splitlines():
        m = _VERDICT.search(line)
        if not m:
            continue
        try:
            obj, _ = _DECODER.raw_decode(line, m.end())
        except ValueError:
            continue
        if isinstance(obj, dict):
            v = Verdict(obj)
            v.line = line
            out.append(v)
    return out


def _norm_msgid(value: str | None) -> str:
    return (value or "").strip().strip("<>").strip()


class MilterguardProcess(MilterProcess):
    """``python -m milterguard serve`` in *workdir*, on a free loopback port.

    :param sets: ``--set KEY=VALUE`` pairs.
    :param extra_args: more command-line arguments (e.g. ``["--workers", "2"]``).
    :param config_text: YAML written to ``etc/local.d/test.yaml``.
    :param rules: ``{file name: YAML text}`` written to ``etc/rules.d/``.
    :param socket: libmilter socket; default ``inet:<free port>@127.0.0.1``.
    :param workers: shorthand for ``--workers N``.

    ``quarantine.url`` defaults to ``workdir/quarantine/quarantine.db``.

    Output goes to ``workdir/milterguard.log`` (appended across restarts).
    """

    def __init__(self, workdir: Path | str, *, sets: Mapping[str, object] | None = None,
                 extra_args: Iterable[str] = (), config_text: str | None = None,
                 rules: Mapping[str, str] | None = None, socket: str | None = None,
                 workers: int | None = None, env: dict[str, str] | None = None) -> None:
        super().__init__(workdir, socket=socket, log_name="milterguard.log", env=env)
        self.etc_dir = self.workdir / "etc"
        self.sets = dict(sets or {})
        # The quarantine lives in the workdir, never under /var/lib.
        self.sets.setdefault("quarantine.url", f"sqlite:///{self.workdir}/quarantine/quarantine.db")
        self.extra_args = list(extra_args)
        self.workers = workers
        for sub in ("local.d", "override.d", "rules.d", "maps"):
            (self.etc_dir / sub).mkdir(parents=True, exist_ok=True)
        if config_text is not None:
            self.write_config(config_text)
        for name, text in (rules or {}).items():
            self.write_rules(name, text)

    # -- etc dir ----------------------------------------------------------
    def write_config(self, text: str, name: str = "test.yaml", layer: str = "local.d") -> Path:
        """Write a YAML file into ``etc/<layer>/`` (local.d or override.d)."""
        path = self.etc_dir / layer / name
        path.write_text(text)
        return path

    def write_main_config(self, text: str) -> Path:
        path = self.etc_dir / "milterguard.yaml"
        path.write_text(text)
        return path

    def write_rules(self, name: str, text: str) -> Path:
        if not name.endswith((".yaml", ".yml")):
            name += ".yaml"
        path = self.etc_dir / "rules.d" / name
        path.write_text(text)
        return path

    def write_map(self, name: str, lines: Iterable[str] | str) -> Path:
        path = self.etc_dir / "maps" / name
        text = lines if isinstance(lines, str) else "".join(f"{line}\n" for line in lines)
        path.write_text(text)
        return path

    # -- process ----------------------------------------------------------
    def argv(self) -> list[str]:
        cmd = [sys.executable, "-m", "milterguard", "serve", "--socket", self.socket,
               "--etc-dir", str(self.etc_dir)]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        for k, v in self.sets.items():
            cmd += ["--set", f"{k}={v}"]
        cmd += self.extra_args
        return cmd

    def reload(self) -> None:
        """SIGHUP: reload the configuration (new connections only)."""
        self.signal(signal.SIGHUP)

    # -- verdicts -----------------------------------------------------------
    def verdicts(self) -> list[Verdict]:
        return parse_verdicts(self.log_text())

    def verdict_for(self, message_id: str, timeout: float = 10.0) -> Verdict:
        """Wait for the verdict of the message with this Message-ID.

        Angle brackets and surrounding space are ignored on both sides.
        """
        want = _norm_msgid(message_id)

        def find() -> Verdict | None:
            for v in reversed(self.verdicts()):
                if _norm_msgid(v.get("message_id")) == want:
                    return v
            if not self.is_running():
                raise SupportError(f"milterguard exited ({self.proc and self.proc.returncode}) "
                                   f"before logging a verdict for {message_id}\n{self.log_tail()}")
            return None

        return wait_until(find, timeout, interval=0.05,
                          what=f"milterguard verdict for {message_id}",
                          on_timeout=lambda: "--- milterguard.log ---\n" + self.log_tail())

    def wait_for_verdicts(self, count: int, timeout: float = 10.0) -> list[Verdict]:
        return wait_until(lambda: (lambda vs: vs if len(vs) >= count else None)(self.verdicts()),
                          timeout, interval=0.05, what=f"{count} milterguard verdict(s)",
                          on_timeout=self.log_tail)
