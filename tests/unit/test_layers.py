"""Keeps docs/architecture.md's layer table true: imports point down only, libraries enter where they may."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"

LAYER = {
    "errors": 0, "units": 0,
    "spec": 1, "executor": 1, "results": 1, "events": 1, "hashing": 1, "store.records": 1, "metrics": 1, "hostfiles": 1,
    "logstore": 1,
    "fsops": 1,
    "yamlfile": 2, "loader": 2, "overrides": 2, "plan": 2, "cron": 2, "cachekey": 2, "cache": 2, "state": 2,
    "imageplan": 2, "engine_socket": 2, "prune": 2, "objectstore": 2, "remote": 2, "cachestore": 2,
    "store": 2,  # and every other store.* module
    "docker_executor": 3, "images": 3, "parallel": 3, "scheduler": 3, "crontab": 3, "runner": 3, "decide": 3,
    "recorder": 3, "backend": 3, "handoff": 3, "swarm_executor": 3, "swarm_backend": 3, "kube_executor": 3, "kube_spec": 1, "notify": 3, "serve_docker": 3, "serve_proxy": 1,
    "compare": 2, "plots": 2, "report": 3,
    "api": 4, "sharing": 4, "serving": 4, "serve_api": 4, "explore": 4,
    "console": 5, "cli": 5, "webpages": 5, "webui": 5, "__main__": 6,
}
LIBRARIES = {
    "docker": {"docker_executor", "images", "serve_docker", "swarm_executor", "swarm_backend"},
    "sqlalchemy": {"store"},  # and every store.* module but store.records
    "networkx": {"plan"},
    "yaml": {"yamlfile"},
    "typer": {"cli"},
    "rich": {"console"},
    "croniter": {"cron"},
    "boto3": {"objectstore"},
    "botocore": {"objectstore"},
    "s3transfer": {"objectstore"},
    "matplotlib": {"plots"},
    "kubernetes": {"kube_executor"},
}


def layer_of(name: str) -> int:
    return LAYER.get(name, LAYER["store"] if name.startswith("store.") else -1)


def allowed(library: str, module: str) -> bool:
    places = LIBRARIES[library]
    return module in places or (library == "sqlalchemy" and module.startswith("store.") and module != "store.records")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts:
            found[".".join(parts)] = path
    return found


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "orchestrator":
                names |= {f"orchestrator.{alias.name}" for alias in node.names}
    return names


def test_every_module_has_a_layer() -> None:
    assert sorted(name for name in modules() if layer_of(name) < 0) == []


def test_imports_point_down_only() -> None:
    wrong = []
    for name, path in modules().items():
        for imported in imports_of(path):
            if not imported.startswith("orchestrator."):
                continue
            target = imported.removeprefix("orchestrator.")
            if target != name and layer_of(target) > layer_of(name):
                wrong.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert wrong == []


def test_libraries_enter_only_where_allowed() -> None:
    wrong = []
    for name, path in modules().items():
        for imported in imports_of(path):
            library = imported.split(".")[0]
            if library in LIBRARIES and not allowed(library, name):
                wrong.append(f"{name} imports {library}")
    assert wrong == []
