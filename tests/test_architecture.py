"""The house rules the folder tree promises: the core stands apart from the backends and analysis,
never asks which backend it talks to, keeps matplotlib off the run path, cites only documents
the repository holds, and its modules import one another without a cycle."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = sorted((REPO / "nectar").rglob("*.py"))
FORBIDDEN = {"simpy", "pynvml", "cvxpy", "sim", "hw", "analysis"}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_backend_and_no_backend_only_library():
    offenders = {str(p.relative_to(REPO)): sorted(_imports(ast.parse(p.read_text())) & FORBIDDEN) for p in CORE}
    assert {k: v for k, v in offenders.items() if v} == {}


def _compares_backend_name(node: ast.AST) -> bool:
    if not isinstance(node, ast.Compare):
        return False
    parts = [node.left, *node.comparators]
    names = any(isinstance(p, ast.Constant) and p.value in ("sim", "nvml") for p in parts)
    attrs = any(isinstance(p, ast.Attribute) and p.attr == "name" for p in parts)
    calls = any(isinstance(p, ast.Call) and getattr(p.func, "id", "") == "getattr" for p in parts)
    return names or (attrs and calls)


def test_core_never_compares_a_backend_name():
    hits = [f"{p.relative_to(REPO)}:{n.lineno}" for p in CORE for n in ast.walk(ast.parse(p.read_text()))
            if _compares_backend_name(n)]
    assert hits == []


def test_the_run_path_does_not_import_matplotlib():
    code = ("import sys, nectar.cli.run, nectar.experiment.runner, nectar.experiment.outputs; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_no_file_cites_a_document_the_repository_lacks():
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md"], capture_output=True, text=True, cwd=REPO).stdout.split()
    external = "DESIGN" + ".md"        # spelled in two parts so that this file does not cite it either
    citing = [f for f in tracked if external in (REPO / f).read_text(errors="ignore")]
    assert citing == [] and (REPO / "docs" / "design.md").is_file()


def test_lact_expert_kind_is_there_for_any_model_config():
    code = ("import nectar.models.gpt2_moe as m; from nectar.moe.experts import EXPERT_KINDS; "
            "c = m.preset_config('tiny-moe', vocab_size=64, n_layer=1, n_embd=16, n_head=2, n_inner=32, n_positions=16, "
            "expert_specs=[{'kind': 'lact', 'hidden': 16}, {'kind': 'gelu', 'hidden': 32}], n_experts=0); "
            "print(type(m.MoEGPT2LMHeadModel(c).moe_layers()[0][1].experts[0]).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().endswith("LaCTMoEExpert")


def _module_name(path: Path, root: Path) -> str:
    """nectar/x/y.py → "nectar.x.y"; a package's __init__.py is the package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def nectar_import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the nectar modules it imports} over every .py file under root/nectar, counting every
    import statement anywhere in the file (function-local and TYPE_CHECKING ones too). `from nectar.x
    import y` is an edge to the module nectar.x.y when there is one, else to nectar.x; `import
    nectar.x.y` to nectar.x.y; relative imports resolve against the importing module's package."""
    files = {_module_name(p, root): p for p in sorted((root / "nectar").rglob("*.py"))}

    def owner(name: str) -> str | None:          # the longest prefix of `name` that is a module here
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else owner(base)
                            for alias in node.names}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, …, a], or None when it has none."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(reversed(exc.args[1]))        # graphlib lists it against the import direction
    return None


def test_nectar_modules_import_one_another_without_a_cycle():
    graph = nectar_import_graph()
    assert "nectar.models.gpt2_moe" in graph["nectar.train.recipes"]      # the graph sees real imports
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle in nectar/: " + " -> ".join(cycle)


ROUTER_CLASSES = {"EnergyAwareRouter", "AdaptiveKRouter", "ThresholdRouter", "TopKRouter", "TopPRouter",
                  "CheapStaticRouter", "MixedTrainingRouter"}


def _family_branches(tree: ast.AST) -> list[int]:
    """Lines that ask which router family an object is: isinstance/issubclass against a router
    class, or hasattr/getattr probing for a router attribute."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("isinstance", "issubclass"):
            classes = node.args[1:] and ast.walk(node.args[1])
            if any(isinstance(n, ast.Name) and n.id in ROUTER_CLASSES for n in classes or []):
                lines.append(node.lineno)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr", "getattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in ("bias", "threshold", "START_PRICE"):
            lines.append(node.lineno)
    return lines


def test_the_controller_knows_no_router_family():
    """nectar/control/ talks to adaptive routers through the priced interface only: it imports
    nothing of nectar.hf and never asks which router class it holds."""
    offenders = {}
    for path in sorted((REPO / "nectar" / "control").glob("*.py")):
        tree = ast.parse(path.read_text())
        mods = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        mods |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        bad = [m for m in mods if m.startswith("nectar.hf")] + [f"line {n}" for n in _family_branches(tree)]
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


def test_the_family_branch_check_sees_a_branch():
    assert _family_branches(ast.parse("if isinstance(r, AdaptiveKRouter):\n    pass")) == [1]
    assert _family_branches(ast.parse("x = r.bias if hasattr(r, 'bias') else r.threshold")) == [1]
    assert _family_branches(ast.parse("if isinstance(r, dict):\n    pass")) == []
