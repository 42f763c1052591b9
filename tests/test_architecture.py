"""The import graph of vascdist has no circle: no two modules import each other, directly or through others,
counting imports inside functions too (an import hidden in a function is still a dependency); and the launchers a
clone's users run by path (launch/) are the scripts the package ships, not copies."""

from __future__ import annotations

import ast

from helpers import REPO


def import_graph() -> dict[str, set[str]]:
    """{module: the vascdist modules it imports}, from the source (AST), relative imports resolved."""
    root = REPO / "vascdist"
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_no_import_circle_inside_vascdist():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import circle: {' -> '.join(path[path.index(n):] + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_launchers_run_by_path_are_the_shipped_scripts():
    from vascdist.launch import SCRIPTS
    for name in SCRIPTS:
        by_path, shipped = REPO / "launch" / name, REPO / "vascdist" / "launch" / name
        assert by_path.is_symlink() and by_path.resolve() == shipped.resolve(), name
