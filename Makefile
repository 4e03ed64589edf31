# Two commands on a fresh machine: `make up` runs the provider, `make test` tests it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.core  # the provider alone: what `make up` needs
STAMP := $(VENV)/.installed  # and the test extra (torch, Ray, ...): what `make test` needs

# Debian packages the tests run for real: podman and runc for containers, busybox for
# the image they run, prometheus for promtool and a real scrape, nginx in front of the
# gateway, nftables and iproute2 for tasks' network rules (and the test's own "outside"
# network namespace), openssh-server for the fleet's SSH hosts, git for uploads from a
# git source, chromium for the dashboard's browser tests, dropbear-bin (the SSH server
# in a rental and its host keys), e2fsprogs (a rental's disk) and openssh-client (the
# tenant's side of a login). Installed by `make test` when missing (as root, apt-get).
TEST_DEBS := podman runc busybox-static prometheus nginx nftables iproute2 openssh-server \
	git chromium dropbear-bin e2fsprogs openssh-client

.PHONY: up test lint format bench clean debs

$(CORE): pyproject.toml setup.py src/gpuprovider/proof/_native.c src/gpuprovider/proof/_merkle.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

up: $(CORE)
	$(BIN)/gpuprovider init
	$(BIN)/gpuprovider up

debs:
	@missing=""; for deb in $(TEST_DEBS); do \
	  dpkg -s $$deb >/dev/null 2>&1 || missing="$$missing $$deb"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q $$missing || { apt-get update -q && apt-get install -y -q $$missing; }; \
	  else echo "not root: the tests that need$$missing will be skipped"; fi; fi

test: $(STAMP) debs
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/openb.py
	$(BIN)/python bench/scheduler_speed.py
	$(BIN)/python bench/check.py
	$(BIN)/python bench/proof.py
	$(BIN)/python bench/ray_backend.py
	$(BIN)/python bench/isolation.py
	$(BIN)/python bench/fuzz.py
	$(BIN)/python bench/dashboard.py
	$(BIN)/python bench/telemetry.py
	$(MAKE) debs TEST_DEBS=wrk
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/market.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
