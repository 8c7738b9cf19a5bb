"""The Job/pod translation of the kubernetes executor (kube_spec.py): pure, runs everywhere."""

from __future__ import annotations

from pathlib import Path

from orchestrator import kube_spec
from orchestrator.executor import (
    LABEL_MANAGED,
    LABEL_PIPELINE,
    LABEL_RUN,
    LABEL_STAGE,
    ContainerSpec,
    Mount,
    SecretFile,
)
from orchestrator.kube_spec import Handoff, Placement

OWNER = "/home/someone/project/with a long path/" + "x" * 80
SPEC = ContainerSpec(
    name="train_model", image_id="sha256:" + "a" * 64, command=("python", "train.py"), entrypoint=None,
    env={"SEED": "1"}, cpus=1.5, memory_bytes=512 << 20, gpus=1, timeout_s=90.5, user="1000:1001",
    secrets=(SecretFile("TOKEN", "s3cr3t"),),
    mounts=(Mount(Path("/runs/r1/data"), "/inputs/data"), Mount(Path("/runs/r1/train"), "/outputs", read_only=False)),
    labels={LABEL_MANAGED: "1", LABEL_PIPELINE: OWNER, LABEL_RUN: "r1", LABEL_STAGE: "train_model"},
)


def job(**kw: object) -> dict:
    args: dict = {"name": "pipe-train-model-1", "image": SPEC.image_id, "agent_image": "sha256:" + "b" * 64,
                  "handoff": Handoff.of(SPEC, [False, False]), "owner": OWNER, "agent_keys": ["go.url"]}
    return kube_spec.job_manifest(SPEC, **{**args, **kw})


def main_of(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]["containers"][0]


def test_job_is_one_attempt_with_pipe_owning_retries_and_the_deadline() -> None:
    m = job()
    assert (m["apiVersion"], m["kind"]) == ("batch/v1", "Job")
    assert m["spec"]["backoffLimit"] == 0
    assert m["spec"]["activeDeadlineSeconds"] == 91
    pod = m["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False


def test_main_container_has_the_sandbox_and_requests_equal_limits() -> None:
    main = main_of(job())
    assert main["securityContext"] == {
        "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "privileged": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}, "runAsNonRoot": True,
        "runAsUser": 1000, "runAsGroup": 1001}
    assert main["resources"]["requests"] == main["resources"]["limits"] == {
        "cpu": "1500m", "memory": str(512 << 20), "nvidia.com/gpu": "1"}
    assert main["args"] == ["python", "train.py"] and "command" not in main  # the image's entrypoint stays
    assert main["imagePullPolicy"] == "Never"


def test_secrets_are_a_volume_never_env_and_inputs_are_read_only() -> None:
    m = job()
    main = main_of(m)
    assert "s3cr3t" not in str(m)
    assert {"name": "SEED", "value": "1"} in main["env"] and "TOKEN" not in str(main["env"])
    mounts = {v["mountPath"]: v for v in main["volumeMounts"]}
    assert mounts["/run/secrets"]["readOnly"] is True
    assert mounts["/inputs/data"] == {"name": "in", "mountPath": "/inputs/data", "subPath": "0", "readOnly": True}
    assert "readOnly" not in mounts["/outputs"]
    secret = kube_spec.secret_manifest("pipe-train-model-1", SPEC.labels, SPEC, {"go.url": b"http://x"})
    assert secret["data"]["secret-TOKEN"] == "czNjcjN0"  # base64 of the value, in the Secret only


def test_agents_fetch_before_and_upload_after() -> None:
    pod = job()["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch"]
    assert [c["name"] for c in pod["containers"]] == ["main", "upload"]
    upload = pod["containers"][1]
    assert upload["securityContext"]["runAsUser"] == 1000  # the stage's user, never root
    assert "until wget" in upload["command"][2] and "base64" in upload["command"][2]


def test_labels_fit_kubernetes_and_the_owner_is_kept_whole() -> None:
    m = job()
    labels = m["metadata"]["labels"]
    assert labels[LABEL_RUN] == "r1" and labels[LABEL_STAGE] == "train_model"
    assert len(labels[LABEL_PIPELINE]) <= 63 and labels[LABEL_PIPELINE] == kube_spec.label_value(OWNER)
    assert m["metadata"]["annotations"][kube_spec.ANNOTATION_PIPELINE] == OWNER
    assert kube_spec.owner_selector(OWNER) == f"{LABEL_MANAGED}=1,{LABEL_PIPELINE}={labels[LABEL_PIPELINE]}"


def test_placement_and_registry_images() -> None:
    placement = Placement({"pool": "gpu"}, ({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},))
    pod = job(placement=placement, image="reg.example/train@sha256:" + "c" * 64)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["imagePullPolicy"] == "IfNotPresent"


def test_dns_names() -> None:
    assert kube_spec.dns_name("pipe", "Train_Model", "ab12") == "pipe-train-model-ab12"
    assert len(kube_spec.dns_name("pipe", "x" * 100)) == 63


def test_pod_view_reads_oom_and_waiting_reasons() -> None:
    pod = {"status": {"phase": "Failed", "containerStatuses": [
        {"name": "main", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    view = kube_spec.pod_view(pod)
    assert (view.main_started, view.main_exit, view.main_reason) == (True, 137, "OOMKilled")
    pending = {"status": {"phase": "Pending", "containerStatuses": [{"name": "main", "state": {"waiting": {
        "reason": "ErrImageNeverPull", "message": "image not present with pull policy of Never"}}}]}}
    assert kube_spec.pod_view(pending).waiting == "ErrImageNeverPull: image not present with pull policy of Never"
    assert kube_spec.pod_view(pending).main_started is False


def test_job_failure_and_event_reason() -> None:
    assert kube_spec.job_failure({"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}) == "DeadlineExceeded"
    assert kube_spec.job_failure({"status": {}}) is None
    events = [{"type": "Normal", "reason": "Scheduled", "lastTimestamp": "2"},
              {"type": "Warning", "reason": "FailedCreatePodSandBox", "message": "no  IP", "lastTimestamp": "3"}]
    assert kube_spec.event_reason(events) == "FailedCreatePodSandBox: no IP"


def test_the_role_in_the_docs_is_the_tested_file() -> None:
    root = Path(__file__).parents[2]
    role = (root / "docs" / "kubernetes-role.yaml").read_text().split("\n", 2)[2]  # less its two comment lines
    doc = (root / "docs" / "kubernetes.md").read_text()
    assert f"```yaml\n{role}```" in doc


def test_the_sandbox_gaps_follow_the_spec() -> None:
    from orchestrator.executor import ContainerSpec
    from orchestrator.kube_spec import GAPS, sandbox_gaps, sandbox_warning

    base = ContainerSpec(name="s", image_id="sha256:" + "a" * 64, command=None)
    assert sandbox_gaps(base) == ("init", "network")
    assert sandbox_gaps(ContainerSpec(name="s", image_id="x", command=None, network=True, pids=10)) == ("init", "pids")
    assert sandbox_warning(base) == f"on kubernetes the stage runs without {GAPS['init']}; {GAPS['network']}"
