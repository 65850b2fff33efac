"""The module map of docs/architecture.md, enforced: each module imports only the modules its
layer may use (type-checking imports included), so no import cycle can form in ``sa_cache`` or
``integrations``."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: module -> the sa_cache modules it may import. Keep in step with docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "stats": set(),
    "codec": set(),
    "keys": set(),
    "breaker": set(),
    "signing": set(),
    "_orm": {"isolation"},
    "isolation": set(),
    "kinds": {"codec", "keys", "stats"},
    "rows": {"codec", "keys", "kinds", "stats"},
    "relationships": {"_orm", "codec", "keys", "kinds", "rows", "stats"},
    "uniques": {"codec", "keys", "kinds", "rows", "stats"},
    "collations": set(),
    "registry": {"errors", "kinds", "relationships", "rows", "uniques"},
    "store": {"errors"},
    "stores.scripts": set(),
    "stores.memory": {"store"},
    "stores.redis": {"_orm", "store", "stores.scripts"},
    "stores.redis_cluster": {"_orm", "store", "stores.redis", "stores.scripts"},
    "stores.redis_sentinel": {"_orm", "store", "stores.redis"},
    "stores": {"errors", "store", "stores.memory", "stores.redis", "stores.redis_cluster",
               "stores.redis_sentinel"},
    "stores.invalidations": set(),
    "protocol": {"codec", "kinds", "store"},
    "near": {"stats", "store", "stores.invalidations"},
    "forecast": {"kinds"},
    "guarded": {"breaker", "codec", "errors", "forecast", "kinds", "protocol", "signing",
                "store"},
    "connections": {"guarded", "kinds"},
    "tracking": {"_orm", "connections", "kinds", "rows"},
    "lookup": {"guarded", "kinds", "protocol", "registry", "store", "tracking"},
    "cache": {"breaker", "errors", "guarded", "lookup", "near", "protocol", "registry",
              "relationships", "rows", "signing", "stats", "store", "stores"},
    "eager": {"_orm", "kinds", "lookup", "registry", "relationships", "rows"},
    "session": {"_orm", "cache", "collations", "connections", "eager", "isolation", "keys",
                "kinds", "lookup", "protocol", "relationships", "rows", "tracking", "uniques"},
    "demo": {"cache", "session"},
    "shared_stats": {"cache", "errors", "stats"},
    "cli": {"cache", "demo", "errors", "shared_stats", "stats"},
    "": {"cache", "errors", "session"},  # the package's __init__: the public names
}
#: what integrations may use: the public front and the few helpers meant for adapters
INTEGRATIONS_MAY_USE = {"", "cache", "session", "errors", "keys", "cli", "shared_stats", "stats",
                        "integrations", "integrations.flask", "integrations.flask_login"}


def _imports(path: pathlib.Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)]
                if node.module:
                    found.add(".".join(parts + [node.module]))
                else:
                    found.update(".".join(parts + [alias.name]) for alias in node.names)
            elif node.module and (node.module == "sa_cache" or node.module.startswith("sa_cache.")):
                found.add(node.module.removeprefix("sa_cache").removeprefix("."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sa_cache"):
                    found.add(alias.name.removeprefix("sa_cache").removeprefix("."))
    return found


def _modules(folder: pathlib.Path, prefix: str) -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([p for p in [prefix, *parts] if p])] = path
    return modules


LIBRARY = _modules(ROOT / "sa_cache", "")


@pytest.mark.parametrize("module", sorted(LIBRARY), ids=lambda m: m or "sa_cache")
def test_each_library_module_imports_only_its_layer(module: str) -> None:
    path = LIBRARY[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    assert module in ALLOWED, f"sa_cache.{module} is not on the map (docs/architecture.md)"
    assert _imports(path, package) <= ALLOWED[module]


def test_the_map_has_no_cycle() -> None:
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        assert seen.get(module) != 1, "import cycle: " + " -> ".join(path + [module])
        if seen.get(module) == 2:
            return
        seen[module] = 1
        for dependency in sorted(ALLOWED.get(module, ())):
            visit(dependency, path + [module])
        seen[module] = 2

    for module in ALLOWED:
        visit(module, [])


@pytest.mark.parametrize("path", sorted((ROOT / "integrations").glob("*.py")), ids=lambda p: p.name)
def test_integrations_use_only_the_public_front(path: pathlib.Path) -> None:
    assert _imports(path, "integrations") <= INTEGRATIONS_MAY_USE
