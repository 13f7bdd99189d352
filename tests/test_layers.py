"""The package's layers and their import direction.

resfast/ops (what an op means: arguments, references, BatchNorm rules, dispatch) imports neither a backend nor the
nn modules; resfast/backends (the implementations) never imports nn; nn (blocks and module inspection) sits on top.
Every import counts: module level and inside functions, absolute and relative, ``import x`` and ``from x import y``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "resfast"

# layer -> the packages it must never import
FORBIDDEN = {
    "resfast.ops": ("resfast.backends", "resfast.nn", "resfast.models", "resfast.convert", "resfast._ext",
                    "resfast._C"),
    "resfast.backends": ("resfast.nn", "resfast.models", "resfast.convert"),
}


def _module_name(path: Path, pkg: Path) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, pkg: Path = PKG) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    name = _module_name(path, pkg)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import x` / `from .. import nn`: the names may be modules themselves
            found += [(node.lineno, mod)] + [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return found


def _violations(layer: str, pkg: Path = PKG) -> list[str]:
    """One entry per offending import statement."""
    bad = {}
    for path in sorted(pkg.joinpath(*layer.split(".")[1:]).rglob("*.py")):
        for line, mod in imports(path, pkg):
            if any(mod == b or mod.startswith(b + ".") for b in FORBIDDEN[layer]):
                bad.setdefault(f"{path.relative_to(pkg.parent)}:{line}", f"imports {mod}")
    return sorted((f"{where} {what}" for where, what in bad.items()),
                  key=lambda b: (b.split(":")[0], int(b.split(" ")[0].rsplit(":", 1)[1])))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    assert _violations(layer) == []


def test_the_check_sees_every_kind_of_import(tmp_path):
    """The import walker resolves relative imports and finds imports inside functions (so the test can fail)."""
    pkg = tmp_path / "resfast"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "ops" / "bad.py").write_text(
        "from ..backends import cpp\n"
        "def f():\n"
        "    from ..nn.layers import is_timm\n"
        "    import resfast.backends.triton.training\n"
        "from .. import nn\n"
    )
    bad = _violations("resfast.ops", pkg)
    assert len(bad) == 4, bad
    assert [b.split(" imports ")[0].rsplit(":", 1)[1] for b in bad] == ["1", "3", "4", "5"], bad
    assert "resfast.backends" in bad[0] and "resfast.nn.layers" in bad[1]
    assert "resfast.backends.triton.training" in bad[2] and "resfast.nn" in bad[3]


def test_layers_exist():
    """The tree shows the layers: ops, backends (eager, cpp, triton with its kernels), nn."""
    for rel in ("ops/dispatch.py", "ops/reference.py", "ops/autograd.py", "ops/recompute.py", "ops/bottleneck.py",
                "backends/eager.py", "backends/cpp.py", "backends/triton/backend.py", "backends/triton/kernels",
                "backends/triton/training.py", "backends/triton/blocks.py", "nn/layers.py", "nn/whole_block.py"):
        assert (PKG / rel).exists(), rel
    assert not (PKG / "triton").exists() and not (PKG / "ops" / "cpp.py").exists()
