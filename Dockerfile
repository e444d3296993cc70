# Terrazzo images. One Dockerfile, two targets, both running as the non-root user `terrazzo`
# (uid/gid 10001, numeric so that Kubernetes' runAsNonRoot can check it) and both installed
# with `-c constraints.txt`, the versions CI tests:
#
#   docker build -t terrazzo .                                # the service (the last stage)
#   docker build --target client -t terrazzo-client .         # the light client: numpy, httpx,
#                                                             # xarray, dask, distributed
#   docker run -p 8000:8000 terrazzo                          # serves the demo catalog
#   docker run -p 8000:8000 -v /srv/cat:/catalog:ro \
#       -e TERRAZZO_CATALOG=/catalog/items.parquet terrazzo   # serves your catalog
#
# The client image runs the Dask scheduler, the Dask workers and deploy/dask_job.py (see
# docker-compose.yml): the scheduler, the workers and the job's client must have the same
# dask/distributed/cloudpickle versions, so they all use this one image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# /data belongs to the service user: a named volume mounted there starts with this owner.
RUN groupadd --gid 10001 terrazzo \
 && useradd --create-home --uid 10001 --gid 10001 terrazzo \
 && mkdir -p /data \
 && chown 10001:10001 /data

# -- build stages: virtual environments in /opt/venv, copied whole into the runtime stages ---

FROM base AS build-client
WORKDIR /src
COPY constraints.txt ./
COPY client ./client
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt "./client[xarray]" distributed \
 && /opt/venv/bin/python -P -c "import terrazzo, xarray, dask.array, distributed"

FROM base AS build-server
WORKDIR /src
# pyproject.toml's readme is README.md: the build needs it.
COPY pyproject.toml constraints.txt README.md ./
COPY client ./client
COPY app ./app
COPY core ./core
# The smoke test imports the installed wheel, not /src (-P: no current directory on sys.path).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt ./client . \
 && /opt/venv/bin/terrazzo --help > /dev/null \
 && /opt/venv/bin/python -P -c "import app.main, core.engine, terrazzo"

# -- runtime stages -------------------------------------------------------------------------

FROM base AS client
COPY --from=build-client /opt/venv /opt/venv
COPY deploy/dask_job.py /opt/terrazzo/dask_job.py
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
WORKDIR /home/terrazzo
CMD ["python", "/opt/terrazzo/dask_job.py"]

FROM base AS server
COPY --from=build-server /opt/venv /opt/venv
COPY deploy/docker-entrypoint.sh /usr/local/bin/terrazzo-entrypoint
RUN chmod 0755 /usr/local/bin/terrazzo-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    TERRAZZO_HOST=0.0.0.0 \
    TERRAZZO_PORT=8000 \
    TERRAZZO_DEMO_DIR=/data/demo
USER 10001:10001
WORKDIR /home/terrazzo
EXPOSE 8000
# The entry point execs `terrazzo serve`: the server is the container's main process (under
# `docker run --init` / compose `init: true`), so signals reach it and a crash ends the
# container for its restart policy. TERRAZZO_WORKERS=N runs N server processes under
# uvicorn's supervisor, which replaces one that dies without restarting the container.
# Liveness; /readyz (catalog answers, compute pool runs a job) gates traffic in compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TERRAZZO_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["terrazzo-entrypoint"]
CMD ["serve"]
