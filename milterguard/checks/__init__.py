"""Python checks.  Importing this package registers every one of them.

Every module in this package is a set of checks: adding a module adds its
checks, with nothing to list here.  Two modules are not checks themselves:
`registry` (the `@check` decorator and what it records, which the engine
reads) and `authshared` (what the sender authentication checks share).
"""

import importlib
import pkgutil

# First, before any check loads dnspython through its own library: it sets dnspython up.
from milterguard.clients import dns_client  # noqa: F401

SUPPORT_MODULES = ("registry", "authshared")

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name not in SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_info.name}")
