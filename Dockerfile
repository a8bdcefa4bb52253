# kvsched image: the Endpoint Picker with its compiled Cython kernels and the native ext_proc
# transport (gRPC C++), which it serves with (extproc.transport: auto picks it).
#   docker build -t kvsched:dev .
# Two stages: the first has the compilers and the gRPC/protobuf/simdjson headers and builds the
# wheel's extensions; the final image gets the installed virtual environment and only the
# shared libraries the native transport links, so it carries no compiler or build headers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev pkg-config \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev libsimdjson-dev \
 && rm -rf /var/lib/apt/lists/*
# The image must serve with the native transport: a missing library fails the build instead of
# falling back to the Python transport.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    KVSCHED_NATIVE_EXTPROC=1
RUN python -m venv /opt/kvsched
WORKDIR /src
# Sources only (see .dockerignore): pip builds kernels/*.pyx into scheduler._native with gcc.
COPY pyproject.toml setup.py README.md ./
COPY kernels ./kernels
COPY scheduler ./scheduler
# kvsched.v1 protos, compiled into scheduler/_proto by setup.py.
COPY proto ./proto
RUN /opt/kvsched/bin/pip install . \
 && /opt/kvsched/bin/python -c "import scheduler.cli, scheduler._native.extproc"

FROM ${PYTHON_IMAGE}
# Same base image as the build stage, so the venv's interpreter link stays valid. The runtime
# halves of the -dev packages above (they pull in abseil, c-ares, re2 and OpenSSL).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgrpc++1.51 libprotobuf32 libsimdjson14 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/kvsched /opt/kvsched
RUN /opt/kvsched/bin/python -c "import scheduler._native.extproc"
# Bytecode was compiled at install time; never write any at run time (read-only root
# filesystem). HOME points at /tmp, the one writable mount.
ENV PATH=/opt/kvsched/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# The numeric uid lets Kubernetes check runAsNonRoot without an /etc/passwd lookup; the chart
# runs the pod as the same uid/gid.
USER 65532:65532
WORKDIR /tmp
# ext_proc gRPC, plaintext gRPC health, Prometheus metrics.
EXPOSE 9002 9003 9090 9004
ENTRYPOINT ["kvsched"]
CMD ["serve", "--config", "/etc/kvsched/config.yaml"]
