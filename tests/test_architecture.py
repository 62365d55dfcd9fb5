"""The shape of the package: imports run one way, and no module grows past a size
a reader can hold.  docs/architecture.md draws the same layers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "milterguard"

# Lower layers never import higher ones.  A new package or root module must be placed here
# (and in docs/architecture.md) before it can be imported.
LAYERS = {
    # the shared vocabulary and configuration
    "model": 0, "settingtypes": 0, "settings": 1, "yamlsrc": 0,
    "config": 2,
    # mail parsing, network clients, rule files, corpus selection
    "mail": 1, "ruleset": 1, "corpus": 1, "clients": 2,
    # learning features, then the stores built on the clients
    "learn": 2, "scoring": 2,
    "stores": 3,
    # checks, then the engine that runs them and the rendering of its verdicts
    "checks": 4,
    "engine": 5, "explain": 5, "metrics": 5,
    # the faces
    "milter": 6, "server": 7, "cli": 8, "__main__": 9, "__init__": 0,
    # the web console: a face over the CLI's operations (it releases and learns through them)
    "web": 9,
}
MAX_LINES = 600


def _unit(path: Path) -> str:
    """The package or root module PATH belongs to (milterguard/mail/mime.py -> mail)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Modules imported when the code runs: `if TYPE_CHECKING:` blocks are left out."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _unit(path)
        edges = graph.setdefault(src, set())
        for name in _runtime_imports(ast.parse(path.read_text(), str(path))):
            parts = name.split(".")
            if parts[0] != "milterguard" or len(parts) < 2:
                continue
            dst = parts[1]
            if dst != src and ((PACKAGE / dst).is_dir() or (PACKAGE / f"{dst}.py").is_file()):
                edges.add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_packages():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_down_the_layers():
    graph = import_graph()
    unplaced = sorted(set(graph) - set(LAYERS))
    assert not unplaced, f"place these in LAYERS and docs/architecture.md: {unplaced}"
    upward = [f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts if LAYERS[dst] >= LAYERS[src]]
    assert not upward, "imports that run up or across the layers: " + ", ".join(sorted(upward))


def test_the_model_imports_nothing_of_the_package():
    assert import_graph()["model"] == set()


def test_no_module_is_too_long_to_read():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_every_layer_in_the_docs():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [name for name in LAYERS if not name.startswith("__") and f"`{name}" not in text]
    assert not missing, f"docs/architecture.md does not name: {missing}"
