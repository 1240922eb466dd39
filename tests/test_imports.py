"""The import graph of allformers/ is a DAG of layers (docs/architecture.md has the same table).

Every module is parsed with `ast`: top-level imports, lazy imports inside functions, relative
imports resolved, and "allformers.x.y:function" strings (the loader tables that
importlib.import_module reads). Importing allformers.a.b also runs allformers/a/__init__.py, so
that counts as an import of allformers.a too. One allowance, documented: a model's save/load
method may call checkpoints' save/load functions (a lazy import, inside the function, of a public
name starting with save/load), since checkpoints is the layer that knows the file formats."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "allformers"

# layer -> the layers it may import besides itself. A layer is a subpackage or a top-level module
# of allformers/; "allformers" is the package's own __init__ (the facade users import).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "errors": (),
    "deprecation": ("errors",),
    "config": ("errors",),  # pure data: no torch (test_config_imports_no_torch)
    "blocks": ("errors", "config"),
    "tokenization": ("errors",),
    "data": ("errors", "tokenization"),
    "diffusion": ("errors",),
    "metrics": ("errors",),
    "objectives": ("errors", "config", "blocks"),
    "generation": ("errors", "config", "blocks", "tokenization"),
    "models": ("errors", "config", "blocks", "tokenization", "data", "diffusion", "objectives", "generation"),
    "checkpoints": ("errors", "config", "blocks", "tokenization", "models"),
    "zoo": ("errors", "config", "blocks", "models", "checkpoints"),
    "allformers": ("errors", "config", "models", "checkpoints", "zoo"),
    "inference": ("errors", "tokenization", "models", "checkpoints"),
    "training": ("errors", "deprecation", "config", "blocks", "tokenization", "data", "objectives", "generation",
                 "models", "checkpoints"),
    "recipes": ("errors", "deprecation", "config", "blocks", "tokenization", "data", "diffusion", "metrics",
                "objectives", "generation", "models", "checkpoints", "zoo", "allformers", "inference", "training", "dialogue"),
    "dialogue": ("errors", "config", "tokenization", "objectives", "generation", "models", "checkpoints",
                 "inference", "training"),
    "serve": ("errors", "config", "blocks", "tokenization", "generation", "models", "checkpoints", "inference"),
    "cli": ("errors", "deprecation", "config", "blocks", "tokenization", "data", "diffusion", "metrics",
            "objectives", "generation", "models", "checkpoints", "zoo", "allformers", "inference", "training",
            "recipes", "dialogue", "serve"),
}
STRING_IMPORT = re.compile(r"^(allformers(?:\.\w+)+)(?::\w+)+$")  # "module:name" or "module:name:name"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "allformers"


class Import:
    def __init__(self, source, target, line, names, lazy):
        self.source, self.target, self.line, self.names, self.lazy = source, target, line, names, lazy

    def where(self) -> str:
        return f"{MODULES[self.source].relative_to(ROOT)}:{self.line}"

    def __str__(self):
        names = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.where()} imports {self.target}{names}"


def _resolve(source: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    package = source if MODULES[source].name == "__init__.py" else source.rsplit(".", 1)[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_of(source: str) -> list[Import]:
    tree = ast.parse(MODULES[source].read_text(), str(MODULES[source]))
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(source, a.name, child.lineno, (), lazy) for a in child.names
                             if a.name.split(".")[0] == "allformers")
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(source, child)
                if target.split(".")[0] == "allformers":
                    for a in child.names:  # `from . import zoo` imports the module allformers.zoo
                        full = f"{target}.{a.name}"
                        found.append(Import(source, full if full in MODULES else target, child.lineno, (a.name,), lazy))
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                m = STRING_IMPORT.match(child.value)
                if m:
                    found.append(Import(source, m.group(1), child.lineno, tuple(child.value.split(":")[1:]), True))
            visit(child, inner)

    visit(tree, False)
    for imp in list(found):  # importing allformers.a.b runs allformers/a/__init__.py first
        parts = imp.target.split(".")
        for k in range(2, len(parts)):
            parent = ".".join(parts[:k])
            if not source.startswith(parent + ".") and source != parent:
                found.append(Import(source, parent, imp.line, imp.names, imp.lazy))
    for imp in found:
        assert imp.target in MODULES, f"{imp}: no such module"
    return found


IMPORTS = [imp for source in MODULES for imp in _imports_of(source)]


def allowed_upward(imp: Import) -> bool:
    """The one documented exception: models' save/load call checkpoints' save/load, lazily."""
    return (layer(imp.source) == "models" and layer(imp.target) == "checkpoints" and imp.lazy
            and bool(imp.names) and all(n.startswith(("save", "load")) for n in imp.names))


def test_docs_architecture_shows_this_table():
    """docs/architecture.md's table is this one: same layers, same allowed imports."""
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|$", (ROOT / "docs" / "architecture.md").read_text(), flags=re.M)
    doc = {name: (set(MAY_IMPORT) - {name} if cell.strip() == "every layer above" else
                  set() if cell.strip() == "\u2014" else {c.strip() for c in cell.split(",")}) for name, cell in rows}
    assert doc == {name: set(deps) for name, deps in MAY_IMPORT.items()}


def test_every_layer_is_in_the_table():
    missing = sorted({layer(m) for m in MODULES} - set(MAY_IMPORT))
    assert not missing, f"layers {missing} are not in MAY_IMPORT (tests/test_imports.py, docs/architecture.md)"


def test_the_table_is_a_dag():
    order, state = [], {}

    def visit(name, path):
        assert state.get(name) != "open", f"MAY_IMPORT has a cycle: {' -> '.join(path + [name])}"
        if name not in state:
            state[name] = "open"
            for dep in MAY_IMPORT[name]:
                visit(dep, path + [name])
            state[name] = "done"
            order.append(name)

    for name in MAY_IMPORT:
        visit(name, [])


def test_layers_import_only_what_the_table_allows():
    bad = {}
    for imp in IMPORTS:
        src, dst = layer(imp.source), layer(imp.target)
        if dst != src and dst not in MAY_IMPORT[src] and not allowed_upward(imp):
            bad.setdefault((imp.where(), dst), f"{imp}: layer {src!r} may import only {list(MAY_IMPORT[src])}")
    assert not bad, "imports against the layer table:\n" + "\n".join(bad.values())


def test_no_private_names_across_layers():
    bad = [f"{imp}: {layer(imp.target)!r}'s underscore names are private to it; make the helper public or move it"
           for imp in IMPORTS if layer(imp.target) != layer(imp.source) and any(n.startswith("_") for n in imp.names)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    edges: dict[str, list[Import]] = {m: [] for m in MODULES}
    for imp in IMPORTS:
        if imp.target != imp.source and not allowed_upward(imp):
            edges[imp.source].append(imp)
    state: dict[str, str] = {}

    def visit(module, stack):
        state[module] = "open"
        for imp in edges[module]:
            if state.get(imp.target) == "open":
                cycle = stack[[s.target for s in stack].index(imp.target) + 1:] if any(
                    s.target == imp.target for s in stack) else stack
                raise AssertionError("import cycle:\n" + "\n".join(str(s) for s in [*cycle, imp]))
            if imp.target not in state:
                visit(imp.target, [*stack, imp])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [])


def test_the_checker_sees_lazy_relative_and_string_imports():
    """The parser must not miss what the rules are about (else the tests above could not fail)."""
    by_source = {}
    for imp in IMPORTS:
        by_source.setdefault(imp.source, []).append(imp)
    lm = by_source["allformers.models.lm"]
    assert any(i.target.startswith("allformers.checkpoints") and i.lazy and i.names == ("save",) for i in lm)
    assert any(i.target == "allformers.blocks" and not i.lazy for i in lm)  # via `from ..blocks.x import` too
    composite = by_source["allformers.checkpoints.composite"]
    assert any(i.target == "allformers.models.vit" and i.names == ("ViTConfig", "ViT") for i in composite)  # a string
    assert any(i.target == "allformers.checkpoints.io" and not i.lazy for i in composite)  # `from .io import` resolved


def test_config_imports_no_torch():
    """config.py is pure data: build and validate configs with torch unimportable (allformers/__init__.py,
    which imports the models, is bypassed by a bare package module)."""
    code = f"""
import sys, types
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
pkg = types.ModuleType("allformers"); pkg.__path__ = [{str(PKG)!r}]; sys.modules["allformers"] = pkg
from allformers.config import Config, ConfigError, SavedConfig
c = Config(n_layer=2, n_embd=64, n_head=4, n_kv_head=1, position="rotary", mlp_class="GLU", activation="silu",
           attention_pattern=["global", "local"], window_size=8, attention_class="Attention")
assert c.head_dim == 16 and Config.from_dict(c.to_dict()) == c
for bad in (dict(attention_class="Nope"), dict(attention_pattern=["nope"])):
    try:
        Config(**bad)
    except ConfigError:
        pass
    else:
        raise SystemExit(f"{{bad}} was accepted")
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
