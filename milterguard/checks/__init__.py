"""Python checks.  Importing this package registers every one of them.

Every module in this package is a set of checks: adding a module adds its
checks, with nothing to list here.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
