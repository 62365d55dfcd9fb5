"""Python checks.  Importing this package registers every one of them.

Every module in this package is a set of checks: adding a module adds its
checks, with nothing to list here.
"""

import importlib
import pkgutil

# dnspython, which the DNS checks use, imports an HTTP client for DNS over HTTPS as it
# loads (0.15 s at start-up); milterguard asks its name servers over UDP and TCP only.
try:
    importlib.import_module("dns._features").force("doh", False)
except (ImportError, AttributeError):
    pass  # a dnspython without the switch (before 2.5): it loads the client, no harm done

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
