"""The house stays easy to walk: qcore/ never imports Ray, and no two qcore modules import each other (directly or
through others), counting imports inside functions too."""
import ast
from pathlib import Path

QCORE = Path(__file__).resolve().parent.parent / "qcore"


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in QCORE.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                if mod.startswith("qcore."):
                    dep = mod.split(".")[1]
                    if dep != name and (QCORE / f"{dep}.py").exists():
                        deps.add(dep)
                if mod.split(".")[0] == "ray":
                    deps.add("ray")
        graph[name] = deps
    return graph


def test_qcore_never_imports_ray():
    assert {m for m, deps in _imports().items() if "ray" in deps} == set()


def test_no_import_circle_in_qcore():
    graph = {m: d - {"ray"} for m, d in _imports().items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(m):] + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
