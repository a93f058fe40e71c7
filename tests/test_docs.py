"""The docs cover the public API, the README's figures point at RESULTS.md, and the package has no import cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lightning_compact

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_compact"
REFERENCE = REPO / "docs" / "reference"


def _directives() -> set[str]:
    """Every ``::: identifier`` of the API reference pages (mkdocstrings renders each)."""
    found: set[str] = set()
    for page in REFERENCE.glob("*.md"):
        found |= set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M))
    return found


def test_every_public_name_has_a_reference_entry() -> None:
    directives = _directives()
    missing = []
    for name in lightning_compact.__all__:
        defined_in = getattr(getattr(lightning_compact, name), "__module__", "")
        if f"lightning_compact.{name}" not in directives and f"{defined_in}.{name}" not in directives:
            missing.append(name)
    assert not missing, f"add `::: lightning_compact.NAME` to a page of docs/reference/ for: {missing}"


def test_every_reference_page_is_in_the_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in REFERENCE.glob("*.md"))
    assert pages and all(f"reference/{p}" in nav for p in pages), pages


def _github_slug(heading: str) -> str:
    # GitHub's anchor rule: lower case, drop punctuation but hyphens/underscores, spaces to hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_links_only_to_results_sections_that_exist() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    headings = re.findall(r"^#+ (.+)$", (REPO / "benchmarks" / "RESULTS.md").read_text(), flags=re.M)
    anchors = {_github_slug(h) for h in headings}
    linked = re.findall(r"\]\(benchmarks/RESULTS\.md#([^)]+)\)", readme)
    assert linked, "the README's results table links to RESULTS.md sections"
    assert not [a for a in linked if a not in anchors], [a for a in linked if a not in anchors]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports at run time (lazy imports inside functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from pkg import submodule` imports the submodule; `from module import name` the module.
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_estimator_is_below_the_planner() -> None:
    graph = import_graph()
    assert "lightning_compact.memory.estimator" in graph["lightning_compact.memory.planner"]
    assert "lightning_compact.memory.planner" not in graph["lightning_compact.memory.estimator"]


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_site_landing_page_is_the_readme_not_a_copy() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    index = (REPO / "docs" / "index.md").read_text()
    assert hooks.MARKER in index and "# lightning-compact" not in index  # nothing of the README is copied there
    page = hooks.readme_for_site((REPO / "README.md").read_text())
    assert page.startswith("# lightning-compact") and "](results.md#" in page
    assert "](benchmarks/RESULTS.md" not in page and "](docs/" not in page and "](tests/" not in page
    assert "## Documentation" not in page
