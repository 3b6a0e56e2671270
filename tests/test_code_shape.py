"""The code keeps the shape that makes it easy to change: a training loop that fits on a screen, no import cycles."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmalign"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """mmalign module -> the mmalign modules it imports anywhere in its source (function-level imports too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            imported.update(t for t in targets if t in modules and t != name)
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_train_loop_fits_on_a_screen():
    source = (PACKAGE / "train.py").read_text()
    assert len(source.splitlines()) < 350
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80}
    assert not long, f"functions over 80 lines in train.py: {long}"


def test_no_import_cycles():
    graph = import_graph()
    assert "mmalign.eval.runner" in graph["mmalign.report"]  # the graph sees the imports it should
    found = cycles(graph)
    assert not found, found


def test_config_does_not_import_what_builds_on_it():
    graph = import_graph()
    above = tuple(f"mmalign.{m}" for m in ("eval", "model", "train", "build", "report", "cli"))
    assert not {m for m in graph["mmalign.config"] if m.startswith(above)}
    assert not graph["mmalign.report"] & {"mmalign.cli", "mmalign.train"}
