"""Names of the defects the parser finds in malformed mail.

Rules and checks refer to these, so they are spelled in one place; each is
also a symbol declared in rules/mime.yaml or rules/headers.yaml.
"""

MIME_BAD_BOUNDARY = "MIME_BAD_BOUNDARY"
MIME_BAD_BASE64 = "MIME_BAD_BASE64"
MIME_BAD_CHARSET = "MIME_BAD_CHARSET"
MIME_MISSING_VERSION = "MIME_MISSING_VERSION"
MIME_TOO_DEEP = "MIME_TOO_DEEP"
MIME_TOO_MANY_PARTS = "MIME_TOO_MANY_PARTS"
HEADER_8BIT = "HEADER_8BIT"
HEADER_NO_COLON = "HEADER_NO_COLON"
DEFECTS = frozenset({
    MIME_BAD_BOUNDARY, MIME_BAD_BASE64, MIME_BAD_CHARSET, MIME_MISSING_VERSION,
    MIME_TOO_DEEP, MIME_TOO_MANY_PARTS, HEADER_8BIT, HEADER_NO_COLON,
})

