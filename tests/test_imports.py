"""The package structure a maintainer relies on: no import cycle between kdaudit's parts,
`attacks` never imports kdaudit, and no module imports another's private name."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Module name → (imported module, imported names) for every import, lazy ones too."""
    out: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for package in ("kdaudit", "attacks"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    out[module].append((node.module, [a.name for a in node.names]))
                elif isinstance(node, ast.Import):
                    out[module] += [(a.name, []) for a in node.names]
    return out


def _part(module: str) -> str:
    """The unit of layering: a subpackage or top-level module (kdaudit.train, kdaudit.api)."""
    return ".".join(module.split(".")[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def _part_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imports in _imports().items():
        for target, _ in imports:
            if target.split(".")[0] == "kdaudit" and _part(target) != _part(module) \
                    and _part(module) != "kdaudit":          # the package root re-exports
                edges[_part(module)].add(_part(target))
    return edges


def test_no_cycle_between_kdaudit_parts():
    assert _cycles(_part_edges()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = _part_edges()
    edges["kdaudit.train"].add("kdaudit.dp")        # dp imports train: this closes a loop
    assert any({"kdaudit.dp", "kdaudit.train"} <= set(c) for c in _cycles(edges))


def test_attacks_never_imports_kdaudit():
    bad = [(m, t) for m, imports in _imports().items() if m.startswith("attacks")
           for t, _ in imports if t.split(".")[0] == "kdaudit"]
    assert bad == []


def test_no_private_name_is_imported_from_another_module():
    bad = [(m, t, n) for m, imports in _imports().items() for t, names in imports
           if t.split(".")[0] in ("kdaudit", "attacks") for n in names if n.startswith("_")]
    assert bad == []


def test_thread_policy_defaults_to_a_short_spin_and_respects_the_user(monkeypatch):
    from kdaudit import threads

    for var in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KDAUDIT_THREADS"):
        monkeypatch.delenv(var, raising=False)
    threads.configure()
    assert os.environ["GOMP_SPINCOUNT"] == threads.SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    threads.configure()
    assert os.environ["GOMP_SPINCOUNT"] == "5"            # the user's value stays
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("KDAUDIT_THREADS", "off")
    threads.configure()
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("KDAUDIT_THREADS", "")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")        # the user chose a policy
    threads.configure()
    assert "GOMP_SPINCOUNT" not in os.environ


def test_scoring_device_follows_kdaudit_device_then_cuda(monkeypatch):
    import torch

    from kdaudit.models import compute_device

    monkeypatch.delenv("KDAUDIT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert compute_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device() == torch.device("cuda")
    monkeypatch.setenv("KDAUDIT_DEVICE", "cpu")
    assert compute_device() == torch.device("cpu")


def test_openmp_runs_with_kdaudit_s_spin_when_kdaudit_is_imported_first():
    """What OpenMP itself reports (OMP_DISPLAY_ENV): kdaudit's short spin after
    `import kdaudit, torch`, torch's own 300,000 turns with KDAUDIT_THREADS=off."""
    from kdaudit import threads

    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KDAUDIT_THREADS")}
    spins = {}
    for mode in ("", "off"):
        proc = subprocess.run([sys.executable, "-c", "import kdaudit, torch"], capture_output=True,
                              text=True, env={**env, "KDAUDIT_THREADS": mode,
                                              "OMP_DISPLAY_ENV": "verbose"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stdout + proc.stderr)
        if found is None:
            pytest.skip("this torch build's OpenMP is not libgomp (no GOMP_SPINCOUNT shown)")
        spins[mode] = int(found.group(1))
    assert spins == {"": int(threads.SPINCOUNT), "off": 300000}
