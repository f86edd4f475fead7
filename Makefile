# Namek web. `make run` starts Namek; `make test` runs the whole suite. Both install
# whatever is missing first: Debian packages (as root), the virtualenv, npm packages.
SHELL := /bin/bash
.DEFAULT_GOAL := run

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := xvfb x11vnc tigervnc-standalone-server tigervnc-tools chromium fonts-liberation \
	xdotool x11-utils tmux bubblewrap socat redis-server postgresql ffmpeg
# A command each package provides: what `system` checks for before calling apt.
NEEDED_COMMANDS := Xvfb x11vnc Xvnc vncpasswd chromium xdotool xdpyinfo tmux bwrap socat setpriv redis-server pg_ctlcluster ffmpeg

.PHONY: run test bench lint setup system python frontend db lock clean

run: setup
	$(PY) manage.py namek_run

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m tests.benchmarks.relay_bench
	$(PY) -m tests.benchmarks.platform_bench
	$(PY) -m tests.benchmarks.terminal_bench
	$(PY) -m tests.benchmarks.events_bench
	$(PY) -m tests.benchmarks.control_bench
	$(PY) -m tests.benchmarks.wall_bench

lint: python
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

setup: system python frontend db

system:
	@missing=""; for c in $(NEEDED_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  pkgs="$(APT_PACKAGES)"; \
	  $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || pkgs="$$pkgs python3-venv"; \
	  command -v npm >/dev/null || pkgs="$$pkgs nodejs npm"; \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs; \
	  else \
	    echo "Missing:$$missing. Run as root, then run make again:"; \
	    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $$pkgs"; \
	    exit 1; \
	  fi; \
	fi

python: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	touch $@

# noVNC and xterm.js come from npm (package-lock.json) and are copied, untouched, into
# static/vendor, which git ignores.
frontend: static/vendor/.installed

static/vendor/.installed: package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	rm -rf static/vendor && mkdir -p static/vendor/novnc static/vendor/xterm
	cp -r node_modules/@novnc/novnc/core node_modules/@novnc/novnc/vendor node_modules/@novnc/novnc/LICENSE.txt static/vendor/novnc/
	cp node_modules/@xterm/xterm/lib/xterm.mjs node_modules/@xterm/xterm/css/xterm.css \
	   node_modules/@xterm/xterm/LICENSE static/vendor/xterm/
	cp node_modules/@xterm/addon-fit/lib/addon-fit.mjs static/vendor/xterm/
	touch $@

db: python frontend
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py collectstatic --noinput -v 0

lock:
	$(PYTHON) -m venv /tmp/namek-lock-venv && /tmp/namek-lock-venv/bin/pip install -q '.[test]' \
	  && /tmp/namek-lock-venv/bin/pip freeze --exclude namek-web > requirements.lock; rm -rf /tmp/namek-lock-venv

clean:
	rm -rf $(VENV) node_modules static/vendor
