# Namek's web image: Daphne (namek-web), the controller (namek-controller) and the
# migrate Job. Build from the repository's root:
#   docker build -f k8s/images/web.Dockerfile -t namek/web:0.7.0 .
# (web.Dockerfile.dockerignore beside this file limits the context; BuildKit reads it.)

# noVNC and xterm.js from npm, exactly as `make frontend` vendors them.
FROM node:22.12.0-bookworm-slim AS frontend
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund --loglevel=error \
    && mkdir -p vendor/novnc vendor/xterm \
    && cp -r node_modules/@novnc/novnc/core node_modules/@novnc/novnc/vendor node_modules/@novnc/novnc/LICENSE.txt vendor/novnc/ \
    && cp node_modules/@xterm/xterm/lib/xterm.mjs node_modules/@xterm/xterm/css/xterm.css node_modules/@xterm/xterm/LICENSE vendor/xterm/ \
    && cp node_modules/@xterm/addon-fit/lib/addon-fit.mjs vendor/xterm/

FROM python:3.11.13-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NAMEK_DATA_DIR=/var/lib/namek
RUN groupadd --system --gid 10001 namek \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/namek --no-create-home \
       --shell /usr/sbin/nologin namek \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/namek
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY manage.py ./
COPY namek_web namek_web
COPY sandboxes sandboxes
COPY viewer viewer
COPY templates templates
COPY static static
COPY demo demo
COPY --from=frontend /build/vendor static/vendor
# No collectstatic: ASGIStaticFilesHandler serves /static/ from STATICFILES_DIRS (this
# image's static/), and STATIC_ROOT lies in the data dir, an emptyDir in the pods.
USER 10001:10001
EXPOSE 8000
# The same command line as namek_web/serve.py's daphne_command (a test compares them).
CMD ["python", "-m", "daphne", "--bind", "0.0.0.0", "--port", "8000", "--ping-interval", "20", "--ping-timeout", "30", "--websocket-max-message-size", "4194304", "--websocket-max-frame-size", "4194304", "namek_web.asgi:application"]
