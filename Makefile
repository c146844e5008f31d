# The two set-up commands: `make demo` and `make test` each install the locked versions first.
#
# Every environment is built by uv at the version pinned in pyproject.toml ([tool.uv]
# required-version), itself installed with pip into .uv/ on first use. `make demo` and
# `make test` install exactly what uv.lock names; `make test-latest` and `make test-oldest`
# resolve afresh, so a new release that breaks the project shows up in CI first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := $(shell sed -n 's/^required-version = "==\([0-9.]*\)"$$/\1/p' pyproject.toml)
UV_HOME := .uv
UV := $(UV_HOME)/bin/uv
UV_STAMP := $(UV_HOME)/installed-$(UV_VERSION)
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
OLDEST := .venv-oldest

# uv: this interpreter, never a downloaded one; TLS through the machine's certificate store
# (behind a proxy with its own CA, uv's built-in roots fail); .venv wherever uv is told otherwise.
# The interpreter's real path: given a pyenv shim, uv would rebuild .venv on every sync.
export UV_PYTHON := $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
export UV_PYTHON_DOWNLOADS := never
export UV_SYSTEM_CERTS := 1
export UV_PROJECT_ENVIRONMENT := $(VENV)
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test test-latest test-oldest lint format proto bench lock clean \
	env-demo env-dev

$(UV_STAMP):
	@test -n "$(UV_VERSION)" || { echo "pyproject.toml: [tool.uv] required-version not found"; exit 1; }
	@echo "==> installing the installer: uv $(UV_VERSION) into $(UV_HOME)/ (with $(PYTHON))"
	rm -rf $(UV_HOME)
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --disable-pip-version-check "uv==$(UV_VERSION)"
	touch $@

# $(call sync,FLAGS,WHAT): say what is about to happen, then let uv show its own progress.
define sync
	@test -x $(BIN)/python || echo "==> creating $(VENV) with $$($(PYTHON) --version)"
	@n=$$($(UV) sync --locked $(1) --dry-run 2>&1 | sed -n 's/^Would install \([0-9]*\) package.*/\1/p'); \
	if [ -n "$$n" ]; then echo "==> installing $$n locked packages into $(VENV): $(2)"; \
	else echo "==> $(VENV) already holds the locked packages: $(2)"; fi
	$(UV) sync --locked $(1)
endef

# Runtime packages only. --inexact keeps the test tools a `make test` installed earlier.
env-demo: $(UV_STAMP)
	$(call sync,--no-dev --inexact,the runtime (no test or lint tools))

# Runtime plus the dev group, and nothing else (an exact sync).
env-dev: $(UV_STAMP)
	$(call sync,,the runtime and the dev group (tests, lint))

demo: env-demo
	@echo "==> starting the demo: a coordinator and four hospital sites on loopback"
	$(BIN)/alliance demo

test: env-dev lint
	@echo "==> the test suite on the locked versions"
	$(BIN)/python -m pytest -q

lint: env-dev
	@echo "==> lint: ruff check, ruff format --check, mypy"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The newest release of everything pyproject.toml allows, the project installed as
# `pip install .` installs it (not editable). --no-config: the lock-only constraints in
# [tool.uv] do not apply; .ci/latest-overrides.txt lifts lifelines' pandas<3 cap (see there).
# build/ goes too: setuptools would put files left there by an earlier build into the wheel.
test-latest: $(UV_STAMP)
	@echo "==> creating $(LATEST) from nothing (resolved afresh on every run)"
	rm -rf $(LATEST) build
	$(UV) venv --no-config --quiet $(LATEST)
	@echo "==> installing the newest releases pyproject.toml allows, the project not editable"
	$(UV) pip install --no-config --refresh --python $(LATEST)/bin/python \
		--override .ci/latest-overrides.txt . --group dev
	@$(LATEST)/bin/python .ci/versions.py --require "pandas>=3"
	@echo "==> smoke test: the installed alliance simulate, from a folder outside the repository"
	bash .ci/smoke $(LATEST)
	@echo "==> the test suite on the newest releases"
	$(LATEST)/bin/python -m pytest -q

# The lowest version of each direct dependency (newest of the rest) on this Python: the lower
# bounds in pyproject.toml are claims, and this pass checks them.
test-oldest: $(UV_STAMP)
	@echo "==> creating $(OLDEST) from nothing"
	rm -rf $(OLDEST) build
	$(UV) venv --no-config --quiet $(OLDEST)
	@echo "==> installing the oldest releases pyproject.toml allows, the project not editable"
	$(UV) pip install --no-config --refresh --python $(OLDEST)/bin/python \
		--resolution lowest-direct . --group dev
	@$(OLDEST)/bin/python .ci/versions.py --at-lower-bounds
	@echo "==> the test suite on the oldest releases"
	$(OLDEST)/bin/python -m pytest -q

# Re-resolve uv.lock after editing dependencies in pyproject.toml (`make lock ARGS=--upgrade`
# moves every package to its newest allowed release).
lock: $(UV_STAMP)
	$(UV) lock $(ARGS)

format: env-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: env-dev
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protocol/wire/alliance.proto

bench: env-dev
	$(BIN)/python -m simulations.bench_roundtrip
	$(BIN)/python -m simulations.bench_site_mean

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) $(UV_HOME) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
