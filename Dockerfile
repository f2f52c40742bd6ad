# flctl's container image: the coordinator (`serve`), a client (`join`) and every other command.
#
#   docker build -t flctl .                       # python:3.11-slim-bookworm, CPU torch
#   docker run --rm flctl --version
#
# Build arguments (docs/deployment.md):
#   BASE             the base image; any Debian bookworm with python3 and python3-venv
#                    (scripts/build-image builds one with mmdebstrap: flctl-base:bookworm)
#   TORCH_VERSION    the torch release (2.13.0 is the one flctl is tested with)
#   TORCH_INDEX_URL  where torch and its dependencies come from; the default is the CPU build.
#                    https://pypi.org/simple gives PyPI's Linux build, which brings CUDA.
#   PIP_INDEX_URL    where flctl's other dependencies come from (default PyPI)
#   PIP_EXTRA_ARGS   extra options for every pip install ("--no-index": only the wheels below)
# Wheels in the optional folder .whl/ of the build context are offered to pip first
# (e.g. a local torch-2.13.0+cpu wheel where download.pytorch.org cannot be reached;
# scripts/build-image fills it with `pip download`).

ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/flctl with torch and the dependencies; wheel: flctl
# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS build

ENV PATH=/opt/flctl/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Wheels offered to pip before any index: the optional folder .whl/ of the build context.
# pyproject.toml is named too so that this COPY has a source when .whl/ does not exist.
COPY pyproject.toml .whl* /tmp/wheels/
# Extra options for every pip install, e.g. "--no-index" to install from .whl/ alone.
ARG PIP_EXTRA_ARGS=""

# python3 from the base: /usr/local/bin/python3 (python images) or /usr/bin/python3 (Debian)
RUN python3 -m venv /opt/flctl \
 && pip install --find-links /tmp/wheels ${PIP_EXTRA_ARGS} --upgrade pip "setuptools>=77" wheel

# torch first, on its own layer: the largest download, changed least often.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --find-links /tmp/wheels --index-url "${TORCH_INDEX_URL}" ${PIP_EXTRA_ARGS} \
      "torch==${TORCH_VERSION}"

# flctl's dependencies (and its postgres extra), read from pyproject.toml: a change to the
# source does not install them again.
ARG PIP_INDEX_URL=https://pypi.org/simple
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p.get('optional-dependencies', {}).get('postgres', [])))" \
      > /tmp/requirements.txt \
 && pip install --find-links /tmp/wheels --index-url "${PIP_INDEX_URL}" ${PIP_EXTRA_ARGS} \
      -r /tmp/requirements.txt "torch==${TORCH_VERSION}"

# flctl itself, as a wheel; its dependencies are in place, so nothing is downloaded here.
FROM build AS wheel
COPY README.md ./
COPY templates ./templates
COPY flctl ./flctl
RUN pip wheel --no-build-isolation --no-deps --wheel-dir /wheel .

# ---------------------------------------------------------------------------------------------
# runtime: the base, the virtual environment and a non-root user (psycopg's binary wheel brings
# its own libpq)
# ---------------------------------------------------------------------------------------------
FROM ${BASE}

RUN groupadd --gid 10001 flctl \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/flctl \
      --shell /usr/sbin/nologin flctl \
 && mkdir -p /project/.flctl /project/.flctl-client /certs /blobs \
 && chown flctl:flctl /project /project/.flctl /project/.flctl-client /certs /blobs \
 && chmod 0700 /certs

ENV PATH=/opt/flctl/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    HOME=/home/flctl

# The dependencies (a large layer, cached while pyproject.toml is unchanged), then flctl (a
# small one): `pip install .[postgres]` from the wheel, every dependency already satisfied.
COPY --from=build /opt/flctl /opt/flctl
COPY --from=wheel /wheel /tmp/wheel
RUN pip install --no-index --find-links /tmp/wheel "flctl[postgres]" \
 && rm -rf /tmp/wheel \
 && flctl --version

USER 10001:10001
WORKDIR /project
# State (serve.json, uploads in progress; on one machine also state.db and blobs/) and
# certificates. The project itself (flctl.toml, task.py) is mounted at /project; coordinators
# sharing a PostgreSQL store also mount one blob folder, e.g. at /blobs.
VOLUME ["/project/.flctl", "/certs"]
EXPOSE 7070

ENTRYPOINT ["flctl"]
CMD ["--help"]
