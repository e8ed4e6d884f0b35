"""The package's module graph: the generation loop and its backends import without cycles."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import hart_fast

PKG = os.path.dirname(hart_fast.__file__)


def _module_imports():
    """{module: {hart_fast modules it imports at module level}} from the source (no import side effects)."""
    graph = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            deps = set()
            for node in ast.parse(open(path, encoding="utf-8").read()).body:  # top level only
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hart_fast"):
                    deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("hart_fast"))
            graph[name] = {d for d in deps if d in _all_modules()}
    return graph


def _all_modules():
    out = set()
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out.add(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    return out


def _cycle_through(graph, start):
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in graph.get(node, ()):
            if dep == start:
                return path + [dep]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return None


def test_loop_engine_and_pipeline_have_no_import_cycle():
    graph = _module_imports()
    # hart_fast.ops._checks reads hart_fast.ops' flags at call time (documented there); the
    # package __init__ files re-export their children.  Everything else must be acyclic.
    for pkg in ("hart_fast", "hart_fast.ops", "hart_fast.model"):
        graph[pkg] = set()
    for mod in ("hart_fast.generation", "hart_fast.engine", "hart_fast.reference", "hart_fast.pipeline",
                "hart_fast.kernel_plan", "hart_fast.options", "hart_fast.loading"):
        assert mod in graph, mod
        assert _cycle_through(graph, mod) is None, f"import cycle: {' -> '.join(_cycle_through(graph, mod))}"
    assert "hart_fast.pipeline" not in graph["hart_fast.engine"]
    assert "hart_fast.engine" not in graph["hart_fast.pipeline"]  # the engine is built on first use
    # The loop needs no backend: sampling, and the pruning plan (pure torch, no backend either).
    assert graph["hart_fast.generation"] <= {"hart_fast.sampling", "hart_fast.pruning"}
    assert not {m for m in graph["hart_fast.pruning"] if m.startswith("hart_fast")}


def test_engine_imports_first_in_a_fresh_interpreter():
    for mod in ("hart_fast.engine", "hart_fast.generation", "hart_fast.pipeline"):
        subprocess.run([sys.executable, "-c", f"import {mod}"], check=True, cwd=os.path.dirname(PKG))
