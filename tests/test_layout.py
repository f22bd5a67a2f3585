"""The architecture's import rules (docs/architecture.md), read from the source: every import, lazy ones too.

- gan/ imports nothing of this project outside gan/ (it runs the same under horovodrun as under python -m).
- providers/ import only providers.* of this project: never the harness, the lab or the workload.
- the product (harness.* outside harness.lab and harness.bench) never imports the lab or the benchmarks;
  the one exception is the `cloudbench lab` command itself, in harness.cli.
- the lab imports no product module but the provider interface's errors.
- no import circle between modules, lazy imports included.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "gan", "providers")


def modules():
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = f
    return out


def imports(name, path, known):
    """(imported module, line) for each import of a project module in ``path`` (resolved to a known module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in PACKAGES:
                found.append((t, node.lineno))
    return found


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def under(mod, prefix):
    return mod == prefix or mod.startswith(prefix + ".")


def broken(graph, rule):
    return [f"{m}:{line} imports {t}" for m, deps in graph.items() for t, line in deps if rule(m, t)]


def test_gan_imports_only_gan(graph):
    assert broken(graph, lambda m, t: under(m, "gan") and not under(t, "gan")) == []


def test_providers_stand_on_the_provider_interface(graph):
    assert broken(graph, lambda m, t: under(m, "providers") and not under(t, "providers")) == []


def test_product_never_imports_the_lab_or_benchmarks(graph):
    def rule(m, t):
        if not under(m, "harness") or under(m, "harness.lab") or under(m, "harness.bench"):
            return False
        if m == "harness.cli" and t in ("harness.lab.hosts",):  # `cloudbench lab ...` only
            return False
        return under(t, "harness.lab") or under(t, "harness.bench")

    assert broken(graph, rule) == []


def test_the_lab_imports_no_product_module(graph):
    assert broken(graph, lambda m, t: under(m, "harness.lab") and not (
        under(t, "harness.lab") or t == "providers.errors")) == []


def test_no_import_circles(graph):
    edges = {m: {t for t, _ in deps if t != m} for m, deps in graph.items()}
    # A package's __init__ importing its own submodules is not a circle in the sense that matters here.
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif not state.get(t):
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [])
    assert cycles == []


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: an import of the runner from a provider and a lazy circle are both found."""
    known = {"providers.x": tmp_path / "x.py", "harness.runner": tmp_path / "r.py"}
    known["providers.x"].write_text("def f():\n    from harness.runner import trainer_args\n")
    known["harness.runner"].write_text("import providers.x\n")
    g = {m: imports(m, p, known) for m, p in known.items()}
    assert broken(g, lambda m, t: under(m, "providers") and not under(t, "providers")) == \
        ["providers.x:2 imports harness.runner"]
    assert ("providers.x", 1) in g["harness.runner"]


def test_the_product_is_small_enough_to_read():
    """harness/ without the lab and the benchmarks: what a user's run goes through."""
    lines = sum(len(f.read_text().splitlines()) for f in (ROOT / "harness").rglob("*.py")
                if not {"lab", "bench"} & set(f.relative_to(ROOT / "harness").parts[:-1]))
    assert lines < 3000, lines
