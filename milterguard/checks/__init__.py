"""Python checks.  Importing this package registers every one of them."""

from milterguard.checks import envelope, headers, mime, uri  # noqa: F401
