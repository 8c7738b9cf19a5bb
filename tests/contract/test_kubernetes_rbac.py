"""The minimal Role of docs/kubernetes-role.yaml, on the real API server (marker k8s): a ServiceAccount bound to
exactly that Role runs a two-stage `pipe run` (inputs, outputs, logs, cleanup); the same Role less one verb fails
in one line naming what RBAC forbids."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.contract.conftest import _wait_for
from tests.e2e.helpers import pipe

pytestmark = pytest.mark.k8s
ROLE_FILE = Path(__file__).parents[2] / "docs" / "kubernetes-role.yaml"


def _account_kubeconfig(cluster: dict[str, Any], tmp_path: Path, name: str, rules: list[dict[str, Any]]) -> Path:
    """A ServiceAccount bound (RoleBinding) to a Role of `rules` in the test namespace; a kubeconfig with its
    token (the controller-manager's token controller creates the token Secret)."""
    from kubernetes import client as k8s

    api, ns = cluster["api"], cluster["namespace"]
    core, rbac = k8s.CoreV1Api(api), k8s.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(ns, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                     "metadata": {"name": name, "namespace": ns}, "rules": rules})
    core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
    rbac.create_namespaced_role_binding(ns, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]})
    assert _wait_for(lambda: bool(core.read_namespaced_service_account(name, ns).secrets), 60), "no token Secret"
    secret = core.read_namespaced_secret(core.read_namespaced_service_account(name, ns).secrets[0].name, ns)
    token = base64.b64decode(secret.data["token"]).decode()
    admin = yaml.safe_load(Path(cluster["kubeconfig"]).read_text())
    config = {"apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
              "users": [{"name": name, "user": {"token": token}}],
              "contexts": [{"name": name, "context": {"cluster": admin["clusters"][0]["name"], "user": name,
                                                      "namespace": ns}}],
              "current-context": name}
    path = tmp_path / f"{name}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def _pipeline(cluster: dict[str, Any], make_pipeline: Callable[..., Path], tmp_path: Path) -> Path:
    executor = {"kind": "kubernetes", "namespace": cluster["namespace"], "handoff": "s3://pipe-handoff/rbac/",
                "endpoint": cluster["endpoint"], "pending_timeout": "60s"}
    stages = {
        "make": {"image": "pipe-busybox:latest", "inputs": ["raw.txt"],
                 "command": "tr a-z A-Z < raw.txt > /outputs/upper.txt; echo made"},
        "use": {"image": "pipe-busybox:latest", "needs": ["make"], "command": "cat /inputs/make/upper.txt"},
    }
    path = make_pipeline({"executor": executor, "stages": stages}, files={"raw.txt": "least privilege\n"})
    (tmp_path / "project").chmod(0o755)
    return path


def test_the_documented_role_is_enough_and_one_verb_less_is_one_clear_line(
        cluster: dict[str, Any], make_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    role = yaml.safe_load(ROLE_FILE.read_text())
    assert role["kind"] == "Role"
    path = _pipeline(cluster, make_pipeline, tmp_path)

    enough = _account_kubeconfig(cluster, tmp_path, "pipe-minimal", role["rules"])
    done = pipe("run", path, "--json", env={"KUBECONFIG": str(enough)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"
    assert "LEAST PRIVILEGE" in pipe("logs", "latest", "use", path, env={"KUBECONFIG": str(enough)}).stdout

    # the same Role without `create` on jobs: the stage fails in one line that names the verb and the resource
    less = [dict(r, verbs=[v for v in r["verbs"] if not (r["resources"] == ["jobs"] and v == "create")])
            for r in role["rules"]]
    assert less != role["rules"]
    weak = _account_kubeconfig(cluster, tmp_path, "pipe-no-create", less)
    (path.parent / "raw.txt").write_text("changed\n")  # a miss, so a Job is needed
    failed = pipe("run", path, "--json", env={"KUBECONFIG": str(weak)})
    assert failed.returncode == 4, failed.stdout + failed.stderr  # infrastructure, not the stage's own failure
    reason = json.loads(failed.stdout)["stages"]["make"]["reason"]
    assert reason.startswith("RBAC forbids it: jobs.batch is forbidden: "), reason
    assert 'cannot create resource "jobs" in API group "batch"' in reason and "\n" not in reason
    from kubernetes import client as k8s

    # nothing was left: the Secret created before the refused Job is gone
    assert _wait_for(lambda: not k8s.CoreV1Api(cluster["api"]).list_namespaced_secret(
        cluster["namespace"], label_selector="dev.pipe.managed=1").items, 30)
