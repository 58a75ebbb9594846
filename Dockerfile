# The worker image of the GPU work pools (work-pools/kubernetes-gpu.json, docker-gpu.json):
# CUDA runtime, the project installed, the flow's code at the entrypoint the deployments
# name (flows.noisy_student:noisy_student, run from /opt/noisy-student).
#   docker build -t noisy-student:latest .
# The pip wheel of torch brings its own CUDA libraries; the base image gives the driver
# interface (NVIDIA container toolkit on the host) and nothing else is needed.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_LOGGING_EXTRA_LOGGERS=noisy_student
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/noisy-student
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY src/noisy_student/__init__.py src/noisy_student/__init__.py
RUN pip install --upgrade pip && pip install ".[scale]"
COPY . .
RUN pip install --no-deps -e . && noisy-student --help > /dev/null

# A Prefect worker starts the flow run here: `prefect flow-run execute` with the
# deployment's entrypoint, relative to this directory.
CMD ["prefect", "worker", "start", "--pool", "gpu-kubernetes"]
