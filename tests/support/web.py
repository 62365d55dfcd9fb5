"""The web console and a real browser for its tests.

    console = ConsoleProcess(workdir, etc_dir, sets={...}).start()   # `milterguard web` on a free loopback port
    add_user(etc_dir, sets, "alice", "admin", "a long password")     # `milterguard user add`, password on stdin
    browser = chromium(tmp_path)                                      # headless Debian Chromium via chromedriver

The browser is Debian's `chromium` driven by Debian's `chromium-driver` (Selenium is
never let to fetch a browser or a driver).  It is kept on loopback: no background
networking, no component updates, and every host name resolves to nothing
(`--host-resolver-rules`), so that a page can reach only IP addresses; the tests read
its network log (`performance_requests`) to see what it fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from . import LOOPBACK, REPO_ROOT, free_port, port_accepts, stop_process, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_available() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (Debian packages chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[test])"
    return None


def _environ() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def cli_argv(etc_dir: Path, sets: Mapping[str, object]) -> list[str]:
    argv = ["--etc-dir", str(etc_dir)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def add_user(etc_dir: Path, sets: Mapping[str, object], name: str, role: str, password: str) -> None:
    """`milterguard user add NAME --role ROLE`, the password on standard input (not a terminal)."""
    done = subprocess.run([sys.executable, "-m", "milterguard", "user", "add", name, "--role", role,
                           *cli_argv(etc_dir, sets)], input=password + "\n", capture_output=True, text=True,
                          timeout=60, env=_environ(), cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr


class ConsoleProcess:
    """`python -m milterguard web` in WORKDIR, on a free loopback port."""

    def __init__(self, workdir: Path, etc_dir: Path, sets: Mapping[str, object]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.etc_dir = etc_dir
        self.sets = dict(sets)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_file = self.workdir / "web.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ConsoleProcess":
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "milterguard", "web", "--listen", f"{LOOPBACK}:{self.port}",
             *cli_argv(self.etc_dir, self.sets)],
            stdout=log, stderr=subprocess.STDOUT, env=_environ(), cwd=self.workdir, start_new_session=True)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"milterguard web exited: {self.log_file.read_text()[-3000:]}")
            return port_accepts(self.port) or None

        wait_until(ready, 30, what="the console to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)

    def log_text(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


def chromium(workdir: Path):
    """A headless Chromium that logs its network requests; quit() it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(workdir) / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
                "--disable-client-side-phishing-detection", "--metrics-recording-only", "--no-pings",
                "--dns-prefetch-disable", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(Path(workdir) / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    return driver


def performance_requests(driver) -> list[str]:
    """The URLs the browser asked for since the last call (Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    """A PNG of the page: into docs/screenshots/ when MILTERGUARD_SCREENSHOTS is set, else TMP_PATH."""
    where = REPO_ROOT / "docs" / "screenshots" if os.environ.get("MILTERGUARD_SCREENSHOTS") else tmp_path
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
