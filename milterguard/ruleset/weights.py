"""Weight files: the weights of declared symbols, set apart from the rules that declare them.

A weight file is a YAML mapping of symbol names to numbers.  The shipped
one, `rules/weights/learned.yaml`, is written by `bench/combine_weights.py`:
weights fitted on the train split of the shared corpus (see
docs/accuracy.md), so that rules, the shipped model and the thresholds
work as one.  Weight files apply over the rule files' `weight:` and under
the `symbols:` setting (what the operator says wins).  A symbol no rule
declares, or a value that is not a number, is an error with its file and line.
"""

from __future__ import annotations

from milterguard.yamlsrc import SourceError, load_file


def load_weights(paths: list[str]) -> tuple[dict[str, tuple[float, str]], list[str]]:
    """({symbol: (weight, where)}, errors) of the weight files PATHS, later files over earlier ones."""
    found: dict[str, tuple[float, str]] = {}
    errors: list[str] = []
    for path in paths:
        try:
            located = load_file(path)
        except SourceError as exc:
            errors.append(str(exc))
            continue
        data = located.data
        if data is None:
            continue
        if not isinstance(data, dict):
            errors.append(f"{located.loc(())}: a weight file is a mapping of symbols to weights")
            continue
        for symbol, weight in data.items():
            where = str(located.loc((symbol,)))
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                errors.append(f"{where}: the weight of {symbol} must be a number, not {weight!r}")
                continue
            found[str(symbol)] = (float(weight), where)
    return found, errors
