"""The kernels are a leaf package: they import nothing of the engine, so they can be tested and reused alone."""
import ast
from pathlib import Path

import streamt1_engine.kernels as kernels


def test_kernels_import_nothing_of_the_engine():
    # the package root and, in a checkout, the op packages of the top-level kernels/ folder
    files = sorted((Path(root), path) for root in kernels.__path__ for path in Path(root).rglob("*.py"))
    assert len(files) > 10
    escapes = []
    for root, path in files:
        rel = path.relative_to(root)
        inside = len(rel.parent.parts) + 1  # relative levels that stay within the kernels package
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > inside:
                escapes.append(f"{rel}:{node.lineno}")
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n.startswith("streamt1_engine") and not n.startswith("streamt1_engine.kernels") for n in names):
                escapes.append(f"{rel}:{node.lineno}")
    assert escapes == []
