"""The Debian package built from this checkout, once per test run.

Building takes minutes (pip fetches the filter's requirements into the
package's environment), so the tests that install the package share one
build: `debian_package` in conftest.py.  $MILTERGUARD_TEST_DEB names a
package built before from the same tree instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from . import REPO_ROOT

TOOLS = ("dpkg-buildpackage", "dh_virtualenv", "lintian", "apt-get", "dpkg-deb", "fakeroot")


def missing() -> str | None:
    """Why the package cannot be built and installed here, or None."""
    if os.geteuid() != 0:
        return "needs root (apt, a system user)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tests/run.sh installs it)"
    return None


def run(*argv: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for name in list(env):
        if name.startswith("PYTHON"):
            env.pop(name)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def tree_files() -> list[str] | None:
    """The files a clean clone of the checkout has (tracked, or new and not ignored)."""
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         capture_output=True, timeout=60)
    if out.returncode != 0:
        return None
    return [name for name in out.stdout.decode().split("\0") if name and (REPO_ROOT / name).is_file()]


def build(workdir: Path) -> Path:
    """Build the package from a copy of the checkout's files in WORKDIR; return the .deb."""
    files = tree_files()
    if files is None:
        raise RuntimeError("not a git checkout: cannot tell the source files from a build's")
    src = workdir / "milterguard"
    for name in files:
        dest = src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, dest)
    run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src, timeout=1500)
    [deb] = workdir.glob("milterguard_*.deb")
    return deb


def installed_version() -> str:
    out = run("dpkg-query", "-W", "-f=${Status} ${Version}", "milterguard", check=False)
    return out.stdout.split()[-1] if "install ok installed" in out.stdout else ""


def purge() -> None:
    if installed_version():
        run("apt-get", "purge", "-y", "-q", "milterguard", check=False)
