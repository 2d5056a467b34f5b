"""The package's import structure: no module imports in a cycle (function-local imports included), and
the layers stay ordered (data knows nothing of training, serving or the benchmark)."""

import ast
from pathlib import Path

import prisp

ROOT = Path(prisp.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # "pkg.mod.Name" -> "pkg.mod"
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_in_a_cycle():
    graph = _graph()
    assert "prisp.training.loop" in graph and "prisp.batch.sealed" in graph  # the walk saw the package
    assert _cycles(graph) == []


def test_data_layer_imports_no_training_serving_or_bench():
    graph = _graph()
    for name, targets in graph.items():
        if name.startswith("prisp.data"):
            bad = {t for t in targets if t.startswith(("prisp.training", "prisp.serve", "prisp.bench"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_cost_guard_fails_an_unmarked_test_that_loads_the_real_encoder_or_model():
    """conftest's guard keeps the fast lane fast: costs must be marked (slow / encoder / ray)."""
    import pytest

    from prisp.hypernet.encoders import MiniLMEncoder
    from prisp.models import resolve_model

    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.encoder"):
        MiniLMEncoder()
    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.slow"):
        resolve_model("smollm2-135m")
