# comfywatch: the tracking daemon in a container.
# docker build -t comfywatch .
# docker run -v comfywatch-data:/var/lib/comfywatch -v "$PWD/config:/etc/comfywatch:ro" comfywatch
# Any Debian bookworm base with python3 (3.11) and its venv module works as BASE_IMAGE:
# .ci/image builds on one made from Debian's packages.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COMFYWATCH_CONFIG=/etc/comfywatch/comfywatch.toml

# The volume holds the database and the spool (jobs_dir = "/var/lib/comfywatch/spool"):
# job files dropped there by the group are registered once, then moved to done/.
RUN groupadd --system --gid 10001 comfywatch \
    && useradd --system --uid 10001 --gid comfywatch --home-dir /var/lib/comfywatch \
       --no-create-home --shell /usr/sbin/nologin comfywatch \
    && mkdir -p /var/lib/comfywatch/spool/done /var/lib/comfywatch/spool/rejected /etc/comfywatch \
    && chown -R comfywatch:comfywatch /var/lib/comfywatch \
    && chmod 0750 /var/lib/comfywatch \
    && chmod 2770 /var/lib/comfywatch/spool /var/lib/comfywatch/spool/done \
       /var/lib/comfywatch/spool/rejected

WORKDIR /opt/comfywatch

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (same install step as the README's).
COPY README.md ./
COPY daemon ./daemon
COPY migrations ./migrations
RUN /opt/venv/bin/pip install --no-deps . \
    && rm -rf /opt/comfywatch/build

ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
WORKDIR /var/lib/comfywatch
VOLUME ["/var/lib/comfywatch"]
EXPOSE 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["comfywatch", "healthcheck"]
CMD ["comfywatch", "run"]
