"""The import graph of grpo_jax/ has no cycles and no module imports the training run (tests/tools/import_graph.py)."""

import textwrap
from pathlib import Path

from tests.tools.import_graph import find_cycles, import_graph, loop_importers, main, report

ROOT = Path(__file__).resolve().parents[1] / "grpo_jax"


def test_grpo_jax_has_no_import_cycles_and_no_loop_importers():
    graph = import_graph(ROOT)
    assert "grpo_jax.loop" in graph.files and len(graph.files) > 20  # the checker sees the real tree
    assert report(graph) == [], "\n" + "\n".join(report(graph))


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": "from pkg.a import f\nfrom pkg import sub\n",  # a package importing its own parts: no cycle
        "a.py": "from pkg.sub.b import g\n\ndef f():\n    return g()\n",
        "sub/__init__.py": "",
        "sub/b.py": "def g():\n    from ..a import f  # deferred, still a cycle\n    return f\n",
        "loop.py": "",
        "c.py": ('"""Docstring only: import pkg.loop"""\nfrom typing import TYPE_CHECKING\n'
                 "if TYPE_CHECKING:\n    from pkg import loop\n"),
        "d.py": "def run():\n    import pkg.loop\n",
    })
    graph = import_graph(pkg)
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
    assert graph.edges["pkg"] == {"pkg.a": [1], "pkg.sub": [2]}
    assert graph.edges["pkg.sub.b"] == {"pkg.a": [2]}
    assert graph.edges["pkg.c"] == {}  # docstrings and TYPE_CHECKING blocks do not count
    assert loop_importers(graph) == ["pkg.d"]
    assert main([str(pkg)]) == 1


def test_clean_tree_passes(tmp_path, capsys):
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": "from pkg import a, b\n",
        "a.py": "import os\nfrom pkg.b import g\n",
        "b.py": "import numpy\n\ndef g():\n    return 1\n",
    })
    graph = import_graph(pkg)
    assert find_cycles(graph) == [] and loop_importers(graph) == []
    assert main([str(pkg)]) == 0
    assert capsys.readouterr().out.strip() == "3 modules, 3 import edges, no cycles"


def test_self_import_is_a_cycle(tmp_path):
    pkg = _write(tmp_path / "pkg", {"__init__.py": "", "a.py": "def f():\n    from pkg.a import f\n"})
    assert find_cycles(import_graph(pkg)) == [["pkg.a", "pkg.a"]]
