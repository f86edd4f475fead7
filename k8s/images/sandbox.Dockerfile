# A Namek sandbox on Kubernetes (the SandboxTemplate namek-sandbox): the screen servers,
# Debian's Chromium, socat, tmux, and Python with Namek's agent runner, which needs no
# Django (an import-linter contract) but browser-use and its friends. Build from the
# repository's root:
#   docker build -f k8s/images/sandbox.Dockerfile -t namek/sandbox:0.7.0 .
FROM debian:bookworm-20250929-slim
ARG DEBIAN_FRONTEND=noninteractive
# xvfb + x11vnc: the base template; tigervnc-*: the xvnc overlay (Xvnc, vncpasswd);
# tini: every container's entrypoint (signals, zombies).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       xvfb x11vnc tigervnc-standalone-server tigervnc-tools chromium fonts-liberation \
       socat tmux tini bash ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 61001 sandbox \
    && useradd --uid 61001 --gid 61001 --home-dir /home/sandbox --create-home --shell /bin/bash sandbox
COPY requirements.lock /opt/namek/requirements.lock
RUN python3 -m venv /opt/namek/venv \
    && /opt/namek/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /opt/namek/requirements.lock
# Only the runner's package: sandboxes/__init__.py is empty, sandboxes.agents imports no Django.
COPY sandboxes/__init__.py /opt/namek/app/sandboxes/__init__.py
COPY sandboxes/agents /opt/namek/app/sandboxes/agents
COPY k8s/images/sandbox-tmux.conf /etc/namek/sandbox-tmux.conf
ENV PATH=/opt/namek/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH=/opt/namek/app \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    HOME=/home/sandbox
USER 61001:61001
WORKDIR /home/sandbox
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/bin/bash"]
