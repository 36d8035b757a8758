# The outbox sidecar: `docker build -t outbox .` (or `podman build -t outbox .`).
#
# Two stages: the first builds a virtualenv with outbox and its dependencies (the wheel
# carries sql/ inside the package), the second copies only that virtualenv onto a clean
# Python, so no compiler, build tool or pip cache ends up in the image.
#
# Both stages start from the same image: the virtualenv's python is a link to the base
# image's interpreter, so it must be at the same path in both.

FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/outbox
WORKDIR /src

# Dependencies first, read from pyproject.toml alone: a change to outbox's code reuses
# this layer instead of downloading every dependency again.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
 && /opt/outbox/bin/pip install --requirement /tmp/requirements.txt

COPY README.md ./
COPY outbox/ outbox/
COPY sql/ sql/
# pip and setuptools are only needed to install; the running sidecar never imports them.
RUN /opt/outbox/bin/pip install --no-deps . \
 && /opt/outbox/bin/pip uninstall --yes --quiet pip setuptools


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="outbox" \
      org.opencontainers.image.description="Postgres-native webhook delivery sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"

# A user of its own, with a numeric id so that Kubernetes' runAsNonRoot can check it,
# and a passwd entry because libpq looks the current user up to pick a default
# database user name.
# --no-log-init: no lastlog entry, a sparse file that grows with the uid.
RUN groupadd --gid 10001 outbox \
 && useradd --uid 10001 --gid outbox --no-log-init --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin outbox

COPY --from=build /opt/outbox /opt/outbox

# PYTHONDONTWRITEBYTECODE: the .pyc files were compiled at install time, and the root
#   filesystem may be read-only.
# OUTBOX_API_LISTEN: the admin API, /healthz and /metrics must be reachable from outside
#   the container (the default, 127.0.0.1, is only right outside a container).
ENV PATH=/opt/outbox/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OUTBOX_API_LISTEN=0.0.0.0:8080

USER 10001:10001
EXPOSE 8080

# slim has no curl; urlopen raises (exit 1) on a refused connection, a timeout or any
# status other than 2xx. The port follows OUTBOX_API_LISTEN; with OUTBOX_API_LISTEN=off
# there is nothing to ask, so turn the check off too (docker run --no-healthcheck).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ['OUTBOX_API_LISTEN'].rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# Exec form: outbox is PID 1 and gets SIGTERM itself; it finishes the attempts in
# flight and exits 0.
ENTRYPOINT ["outbox"]
CMD ["run"]
