"""Boolean expressions over symbols, for composite rules.

Grammar (lowest precedence first)::

    expr   := term ("|" term)*
    term   := factor ("&" factor)*
    factor := "!" factor | "(" expr ")" | SYMBOL | "group:" NAME

`group:NAME` is true when any symbol of that group hit (with a non-zero
weight, as in Rspamd, so that a group reference is not satisfied by a
report-only symbol).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

_TOKEN = re.compile(r"\s*(?:(?P<op>[&|!()])|(?P<group>group:[a-z][a-z0-9_]*)|(?P<sym>[A-Z][A-Z0-9_]*))")


class ExprError(ValueError):
    pass


@dataclass(frozen=True)
class Sym:
    name: str


@dataclass(frozen=True)
class Group:
    name: str


@dataclass(frozen=True)
class Not:
    arg: "Node"


@dataclass(frozen=True)
class And:
    args: tuple["Node", ...]


@dataclass(frozen=True)
class Or:
    args: tuple["Node", ...]


Node = Union[Sym, Group, Not, And, Or]


def _tokenize(text: str) -> list[str]:
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExprError(f"unexpected {text[pos:pos + 12]!r} at column {pos + 1}")
        out.append(m.group(m.lastgroup))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse(text: str) -> Node:
    """Parse an expression; raise ExprError with the column of the fault."""
    tokens = _tokenize(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ExprError("expression ends too early")
        pos += 1
        return tokens[pos - 1]

    def expr() -> Node:
        args = [term()]
        while peek() == "|":
            take()
            args.append(term())
        return args[0] if len(args) == 1 else Or(tuple(args))

    def term() -> Node:
        args = [factor()]
        while peek() == "&":
            take()
            args.append(factor())
        return args[0] if len(args) == 1 else And(tuple(args))

    def factor() -> Node:
        tok = take()
        if tok == "!":
            return Not(factor())
        if tok == "(":
            node = expr()
            if take() != ")":
                raise ExprError("missing )")
            return node
        if tok.startswith("group:"):
            return Group(tok[6:])
        if tok in "&|)":
            raise ExprError(f"unexpected {tok!r}")
        return Sym(tok)

    node = expr()
    if pos != len(tokens):
        raise ExprError(f"unexpected {tokens[pos]!r} after the expression")
    return node


def symbols(node: Node) -> set[str]:
    """Every symbol the expression names."""
    if isinstance(node, Sym):
        return {node.name}
    if isinstance(node, Group):
        return set()
    if isinstance(node, Not):
        return symbols(node.arg)
    out: set[str] = set()
    for arg in node.args:
        out |= symbols(arg)
    return out


def groups(node: Node) -> set[str]:
    if isinstance(node, Group):
        return {node.name}
    if isinstance(node, Sym):
        return set()
    if isinstance(node, Not):
        return groups(node.arg)
    out: set[str] = set()
    for arg in node.args:
        out |= groups(arg)
    return out


def evaluate(node: Node, has: Callable[[str], bool], has_group: Callable[[str], bool]) -> bool:
    """True when the expression holds for the symbols that hit."""
    if isinstance(node, Sym):
        return has(node.name)
    if isinstance(node, Group):
        return has_group(node.name)
    if isinstance(node, Not):
        return not evaluate(node.arg, has, has_group)
    if isinstance(node, And):
        return all(evaluate(a, has, has_group) for a in node.args)
    return any(evaluate(a, has, has_group) for a in node.args)
