# The AlloyLM image for Ray clusters on Kubernetes (k8s/): Ray's own image with this repository
# installed into its Python, the repository itself at /home/ray/alloylm (the RayJob's working_dir).
#
# CPU:  docker build -t alloylm:0.1.0 .
# GPU:  docker build -t alloylm:0.1.0-gpu \
#         --build-arg BASE_TAG_SUFFIX=-py311-cu128 \
#         --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#         --build-arg WARM_DEEPSPEED=0 .
#
# RAY_VERSION must stay the Ray that pyproject.toml pins and that the k8s/ manifests name in
# `rayVersion` (tests/k8s/test_manifests.py checks both); every node of a cluster runs this same image.
ARG RAY_VERSION=2.60.0
# -py311 is the CPU image; -py311-gpu or -py311-cu12x the CUDA ones (Ray's tags for this version).
ARG BASE_TAG_SUFFIX=-py311
FROM rayproject/ray:${RAY_VERSION}${BASE_TAG_SUFFIX}

# ARGs declared before FROM are out of scope after it: declare the ones used below again.
ARG RAY_VERSION
# torch first, from the index of the wanted build (CPU by default); pip then keeps it.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# 1: compile DeepSpeed's CPU communication op into the image (what `make warm` does); 0: skip
# (GPU images, where DeepSpeed builds nothing ahead of time).
ARG WARM_DEEPSPEED=1

# DeepSpeed JIT-compiles its ops with a C++ compiler and ninja; the Ray image may lack g++.
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
USER ray

ENV TORCH_EXTENSIONS_DIR=/home/ray/.cache/alloylm/torch_extensions \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1

# Made by the ray user: a WORKDIR Docker creates would belong to root, and pip builds in it.
RUN mkdir -p /home/ray/alloylm
WORKDIR /home/ray/alloylm

RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# The package first (its dependencies are the slow layer), the rest of the repository after, so
# that editing a config or a job script does not reinstall everything.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform/ platform/
# Pinning Ray to the base image's version keeps pip from replacing the Ray the image was built for.
RUN pip install . "ray[data,train,tune,serve]==${RAY_VERSION}"

RUN if [ "${WARM_DEEPSPEED}" = "1" ]; then \
        mkdir -p "${TORCH_EXTENSIONS_DIR}" && python -m alloylm.warm; \
    fi

COPY --chown=ray:users . .
