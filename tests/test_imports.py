"""The import graph of DESIGN section 2: lower layers never import higher ones."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "seq2seq"

# Each module's layer; a module may import only modules of a lower layer, plus the few
# same-layer edges listed below (one direction only).
LAYERS = {
    "config": 0, "files": 0, "heap": 0, "tokenizer": 1, "data": 2, "corpus": 2, "model": 2,
    "search": 3, "ensemble": 4, "checkpoint": 4, "distributed": 4, "events": 4, "plot": 4,
    "inference": 5, "evaluate": 5, "tasks": 6, "train": 7, "progress": 8, "cli": 9, "serve": 9,
    "__main__": 10, "__init__": 0,
}
SAME_LAYER = {("evaluate", "inference"), ("corpus", "data"), ("cli", "serve")}


def module_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seq2seq"):
            parts = node.module.split(".")
            if len(parts) > 1:
                names.add(parts[1])
            else:
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "seq2seq" and len(parts) > 1:
                    names.add(parts[1])
    return names


def test_every_module_has_a_layer():
    modules = {module_of(p) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(LAYERS), modules - set(LAYERS)


def test_imports_flow_downward():
    for path in PACKAGE.rglob("*.py"):
        source = module_of(path)
        for target in imported_modules(path) - {source}:
            allowed = LAYERS[target] < LAYERS[source] or (source, target) in SAME_LAYER
            assert allowed, f"{path.relative_to(PACKAGE)} imports seq2seq.{target}"


def test_model_and_data_are_independent_and_search_is_model_free():
    for path in PACKAGE.rglob("*.py"):
        source = module_of(path)
        imports = imported_modules(path)
        if source in ("data", "corpus"):
            assert "model" not in imports
        if source == "model":
            assert "data" not in imports
        if source in ("search", "ensemble"):
            assert "model" not in imports


def top_level_imports(path: Path) -> set[str]:
    """The top-level packages ``path`` imports (``a.b`` counts as ``a``)."""
    tree = ast.parse(path.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    return roots | {n.module.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module}


def test_only_cli_imports_typer():
    for path in PACKAGE.rglob("*.py"):
        if module_of(path) != "cli":
            assert "typer" not in top_level_imports(path), path


def test_only_serve_imports_the_http_stack():
    http = {"fastapi", "starlette", "uvicorn", "pydantic", "httpx"}
    for path in PACKAGE.rglob("*.py"):
        if module_of(path) != "serve":
            assert not top_level_imports(path) & http, path
