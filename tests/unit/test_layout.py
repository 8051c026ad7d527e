"""The package's shape: no import cycles, few top-level modules, one connection factory, scripts as files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dspex_tasks"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _targets(mod: str, is_pkg: bool, node: ast.Import | ast.ImportFrom, mods: dict[str, object]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + (node.module.split(".") if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports: at the top, inside functions and under TYPE_CHECKING alike."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(mod, is_pkg, node, mods):
                    while target not in mods and "." in target:
                        target = target.rpartition(".")[0]
                    if target in mods and target != mod:
                        edges.add(target)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 60  # the walk saw the whole package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_layers_import_downwards() -> None:
    """dsl -> programs -> lm -> worker -> client/gateway/cli: a lower layer never imports a higher one."""
    order = ["dsl", "programs", "lm", "optimize", "worker", "gateway", "cli"]
    graph = import_graph()
    wrong = []
    for mod, edges in graph.items():
        layer = mod.split(".")[1] if mod.count(".") >= 1 else ""
        for target in edges:
            other = target.split(".")[1] if target.count(".") >= 1 else ""
            if layer in order and other in order and order.index(other) > order.index(layer):
                wrong.append(f"{mod} -> {target}")
    # the governed LM builds the mock LM lazily for DSPEX_LM=mock; the mock is testing's, a leaf
    assert wrong == [], wrong


def test_at_most_twelve_modules_at_the_top() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    for folder in ("dsl", "programs", "worker", "lm", "optimize", "observability", "gateway", "testing", "cli"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder


def test_every_redis_client_comes_from_the_connection_factory() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "connections.py":
            continue
        text = path.read_text()
        for m in re.finditer(r"Redis\.from_url\(|redis_lib\.Redis\(|aioredis\.Redis\(|StrictRedis\(", text):
            offenders.append(f"{path.relative_to(PACKAGE)}:{text[:m.start()].count(chr(10)) + 1}")
    assert offenders == []


def test_lua_scripts_are_files_next_to_the_code_that_registers_them() -> None:
    calls = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "redis.call(" not in text or path.name == "connections.py", f"inline Lua in {path.name}"
        for name in re.findall(r'(?:register_)?lua\(\s*(?:[\w.]+,\s*)?__name__,\s*"(\w+)"\)', text):
            calls.append(name)
            assert (path.parent / "lua" / f"{name}.lua").is_file(), (path, name)
    assert len(calls) >= 10  # store (3), rate limits (2), LM cache (2), leases (2), gateway API keys (1)
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert '"lua/*.lua"' in pyproject  # shipped in the wheel


def test_no_retry_decision_reads_message_text() -> None:
    """Retry decisions come from error classes: no code looks for a class name inside a message."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r'f"\(\{name\}\)" in|"\(RateLimitError\)" in|in exc\.message', text), path


def test_public_imports_keep_working() -> None:
    import subprocess
    import sys

    code = ("import sys, dspex_tasks\n"
            "from dspex_tasks import signature, Signature, Client, errors, registry, Job, Result, ProgramStore, "
            "MemoryProgramStore, ProgramRecord, metric\n"
            "assert 'dspy' not in sys.modules, 'the public API imported dspy'\n"
            "from dspex_tasks import MockLM\n"
            "missing = [n for n in dspex_tasks.__all__ if getattr(dspex_tasks, n, None) is None]\n"
            "assert not missing, missing\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_wheel_installs_only_dspex_tasks_with_the_reference_programs_inside() -> None:
    """pyproject lists every package on disk; signatures/ ships as dspex_tasks.examples, workers/ not at all, so an
    installed wheel never shadows a project's own ``signatures`` or ``workers`` (issue 17 item 1)."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dspex_tasks").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    examples = {"dspex_tasks.examples" + ("." + ".".join(p.parent.relative_to(ROOT / "signatures").parts)
                                          if p.parent != ROOT / "signatures" else "")
                for p in (ROOT / "signatures").rglob("__init__.py")}
    assert set(setup["packages"]) == on_disk | examples
    assert setup["package-dir"] == {"dspex_tasks.examples": "signatures"}
    assert not any(p.split(".")[0] in ("signatures", "workers") for p in setup["packages"])


def test_test_modules_have_unique_basenames() -> None:
    """The test folders are not packages: two test files of one name stop collection of the whole run."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
