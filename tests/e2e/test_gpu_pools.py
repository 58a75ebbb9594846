"""The GPU work pools of work-pools/: a real Prefect server accepts each base job template
(`prefect work-pool create --base-job-template`), and the job a worker would submit from
it is checked: the Kubernetes Job against the Kubernetes API schema (strict: an unknown
field fails), the Docker container's GPU request by docker-py's own HostConfig. What needs
a cluster or a Docker daemon runs only where one answers; the skip reasons say so."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import REPO, run

pytestmark = pytest.mark.e2e

POOLS = {"gpu-kubernetes": "kubernetes", "gpu-docker": "docker"}


@pytest.fixture(scope="module")
def server(prefect_server: dict[str, str]) -> dict[str, str]:
    """A Prefect server on loopback (tests/e2e/scale.py) with the two GPU pools created
    from the repository's templates by the commands the README gives."""
    for name, kind in POOLS.items():
        template = REPO / "work-pools" / f"{kind}-gpu.json"
        create = ["prefect", "work-pool", "create", name, "--type", kind]
        run([*create, "--base-job-template", str(template)], REPO, prefect_server)
    return prefect_server


def _stored_template(env: dict[str, str], name: str) -> dict:
    response = httpx.get(f"{env['PREFECT_API_URL']}/work_pools/{name}", timeout=30)
    response.raise_for_status()
    pool = response.json()
    assert pool["type"] == POOLS[name]
    return pool["base_job_template"]


def _job_configuration(env: dict[str, str], kind: str, template: dict, values: dict):
    """The configuration a worker of ``kind`` builds for a flow run (prefect's own code)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if kind == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration as Configuration
    else:
        from prefect_docker.worker import DockerWorkerJobConfiguration as Configuration

    async def build():
        config = await Configuration.from_template_and_values(template, values)
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="noisy-student-run"))
        return config

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(build())


def test_the_server_keeps_the_gpu_variables(server: dict[str, str]) -> None:
    kubernetes = _stored_template(server, "gpu-kubernetes")
    assert kubernetes["variables"]["properties"]["gpus"]["default"] == 1
    container = kubernetes["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    docker = _stored_template(server, "gpu-docker")
    assert docker["variables"]["properties"]["gpus"]["default"] == -1


def _job_manifest(server: dict[str, str], tmp_path: Path) -> Path:
    template = _stored_template(server, "gpu-kubernetes")
    values = {"gpus": 4, "image": "registry.example/noisy-student:1", "namespace": "ml"}
    config = _job_configuration(server, "kubernetes", template, values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.job_manifest, sort_keys=False))
    return path


def test_the_kubernetes_job_requests_the_gpus_and_fits_the_api_schema(
    server: dict[str, str], tmp_path: Path
) -> None:
    import kubernetes_validate

    manifest = yaml.safe_load(_job_manifest(server, tmp_path).read_text())
    pod = manifest["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 4
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"  # /dev/shm for NCCL
    kubernetes_validate.validate(manifest, "1.32", strict=True)
    broken = json.loads(json.dumps(manifest))
    broken["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.32", strict=True)


def _cluster_answers() -> bool:
    if shutil.which("kubectl") is None:
        return False
    probe = subprocess.run(
        ["kubectl", "version", "--request-timeout=5s"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _cluster_answers(),
    reason="kubectl apply --dry-run=client reads the API server's discovery even with "
    "--validate=false, and no Kubernetes cluster answers here; the manifest is checked "
    "against the API schema offline instead (test above)",
)
def test_kubectl_accepts_the_job_manifest(server: dict[str, str], tmp_path: Path) -> None:
    manifest = _job_manifest(server, tmp_path)
    result = subprocess.run(
        ["kubectl", "apply", "--dry-run=client", "-f", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "created (dry run)" in result.stdout


def test_the_docker_container_requests_the_gpus(server: dict[str, str]) -> None:
    from docker.types import HostConfig

    template = _stored_template(server, "gpu-docker")
    config = _job_configuration(server, "docker", template, {"gpus": 2})
    create = config.container_create_kwargs
    host = HostConfig(version="1.45", **create)  # docker-py checks the request itself
    assert host["DeviceRequests"] == [
        {
            "Driver": "nvidia",
            "Count": 2,
            "DeviceIDs": [],
            "Capabilities": [["gpu"]],
            "Options": {},
        }
    ]
    assert host["ShmSize"] == 8 * 1024**3


def _docker_daemon_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(
    not _docker_daemon_answers(), reason="no Docker daemon on this machine: the image is not built"
)
def test_the_worker_image_builds() -> None:
    result = subprocess.run(
        ["docker", "build", "-t", "noisy-student:test", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
