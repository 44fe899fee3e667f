"""limoe's modules import each other one way only: no cycle among the imports that run when a module
is loaded, neither between modules nor between packages (`limoe.plan` uses `limoe.training`, never
the reverse). A cycle works only while every module in it happens to need the others' names late,
and a new objective or modality that adds one import breaks it with a half-initialised module.

Imports inside functions run on use, so they cannot break loading; but one that stands in for a
module-level import only to dodge a cycle hides it. The command line (`limoe.cli`) and `import
limoe` keep theirs on purpose, so that `limoe --help` imports no torch (tests/test_startup.py);
counting every other one, no module and no package is part of a cycle either. (Imports of slow
third-party modules on use, such as open_clip's lists in `limoe.prompt_templates`, do not count:
the graph holds limoe's modules only.)"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "limoe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _every_import(body: list) -> list:
    """Every import statement of a module that can run, those inside functions included (not those
    under `if TYPE_CHECKING:`, which only name types for annotations)."""
    found = []
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            found += _every_import(node.orelse)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        else:
            found += _every_import(list(ast.iter_child_nodes(node)))
    return found


def _load_time_imports(body: list) -> list:
    """The import statements a module runs when it is loaded: its top level, and the branches of
    top-level `if` and `try` statements (an `if TYPE_CHECKING:` block never runs)."""
    found = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _load_time_imports(node.body)
            found += _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            found += _load_time_imports(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                found += _load_time_imports(handler.body)
    return found


def _with_packages(name: str, importer: str, modules: set) -> set:
    """`name` and the packages above it that loading it runs: all but those that already hold the
    importer (Python is loading them when the importer runs)."""
    parts = name.split(".")
    above = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    return {module for module in above if module in modules and not (importer + ".").startswith(module + ".")}


def module_graph(imports=_load_time_imports) -> dict:
    """limoe's modules, each with the limoe modules that loading it loads first (with `_every_import`:
    that it imports at all)."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for importer, path in paths.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        targets = set()
        for node in imports(ast.parse(path.read_text(), filename=str(path)).body):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                targets |= _with_packages(name, importer, modules)
        graph[importer] = targets - {importer}
    return graph


def package_graph(graph: dict) -> dict:
    """The module graph seen from limoe's subpackages: `limoe.training.step` counts as `limoe.training`;
    a module directly under `limoe` stands for itself."""
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages = {}
    for importer, targets in graph.items():
        packages.setdefault(package(importer), set()).update(package(target) for target in targets)
    return {importer: targets - {importer} for importer, targets in packages.items()}


def cycles(graph: dict) -> list:
    """Each strongly connected component of more than one node, sorted (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_finds_a_hand_made_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": set(), "f": {"g"}, "g": {"f"}}
    assert cycles(graph) == [["a", "b", "c"], ["f", "g"]]


def test_the_graph_sees_the_imports_that_run_on_load_and_only_those():
    graph = module_graph()
    assert {"limoe.training.objectives", "limoe.training.losses", "limoe.config"} <= graph["limoe.plan.activations"]
    assert "limoe.plan.memory" in graph["limoe.plan"]  # a package's __init__ re-exports its modules
    assert "limoe.plan" not in graph["limoe.plan.memory"]  # its own package is being loaded already
    assert "limoe.train_command" not in graph["limoe.cli"]  # imported inside the command's function
    assert "limoe.train_command" in module_graph(_every_import)["limoe.cli"]  # counted with every import


def test_no_two_modules_import_each_other_even_through_others():
    assert cycles(module_graph()) == []


def test_no_two_packages_import_each_other_even_through_others():
    assert cycles(package_graph(module_graph())) == []


def _every_import_but_start_up() -> dict:
    """The module graph with the imports inside functions, but for those of `import limoe` and the
    command line (imports on use keep `limoe --help` free of torch)."""
    start_up = {"limoe", "limoe.cli"}
    return {module: targets for module, targets in module_graph(_every_import).items() if module not in start_up}


def test_no_import_inside_a_function_hides_a_cycle_between_modules():
    assert cycles(_every_import_but_start_up()) == []


def test_no_import_inside_a_function_hides_a_cycle_between_packages():
    assert cycles(package_graph(_every_import_but_start_up())) == []


def classes_defined_more_than_once() -> dict:
    """Each class name defined in more than one place in limoe/, with where ("module:line")."""
    places: dict = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                places.setdefault(node.name, []).append(f"{_module_name(path)}:{node.lineno}")
    return {name: where for name, where in places.items() if len(where) > 1}


def test_no_class_name_is_defined_twice():
    """Two classes of one name (two `Task`s, two `Row`s) make an import or a traceback say less than it
    seems to, and invite importing the wrong one; each class's name says what it is."""
    assert classes_defined_more_than_once() == {}
