"""Rule files: the schema, pattern sets, maps and composites."""
