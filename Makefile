# The two commands a newcomer needs: `make run` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# Python may write its bytecode caches (some environments turn them off): the suite
# starts five pytest processes and some 160 `outbox run` processes, and without caches
# each compiles every module it imports again, and pytest rewrites every test module
# again in each process (a third of a worker's start).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup run test test-fast lint format bench clean db-url chromium pgbouncer promtool screenshot verifiers image-test

setup: $(VENV)/.installed

# Reinstall when the dependencies change; the package itself is installed editable.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# OUTBOX_DATABASE_URL if set, else the Postgres on 127.0.0.1:5432, else a private
# cluster in .pgdata started with this machine's initdb/pg_ctl.
run: setup
	@url=$$($(BIN)/python -m tools.localpg url) || exit 1; \
	export OUTBOX_DATABASE_URL="$$url"; \
	$(BIN)/outbox migrate || exit 1; \
	admin=$$($(BIN)/python -c 'from outbox.config import Settings; print(Settings.from_env().admin_url)'); \
	echo; \
	echo "outbox is starting on $$url"; \
	echo "In another terminal, try:"; \
	echo "  export OUTBOX_DATABASE_URL='$$url'"; \
	echo "  .venv/bin/outbox webhooks add --account acct_1 --name 'CRM Sync' --event lead.scored \\"; \
	echo "      --url https://example.com/webhooks --secret 'a-signing-secret-of-16+-chars'"; \
	echo "  .venv/bin/outbox emit acct_1 lead.scored '{\"lead\": {\"id\": 42}, \"score\": {\"overall\": 87}}'"; \
	echo "  .venv/bin/outbox status"; \
	if [ -n "$$admin" ]; then echo "  curl $$admin/healthz"; \
	else echo "  (the admin API is off: OUTBOX_API_LISTEN=off)"; fi; \
	echo "To see deliveries arrive on this machine: .venv/bin/outbox listen (README.md)."; \
	echo "Stop with Ctrl-C."; \
	echo; \
	exec $(BIN)/outbox run

# The suite runs in PYTEST_WORKERS processes (pytest-xdist), two per core by default:
# most of a test's time is spent waiting (on a receiver, a lease, a sidecar starting),
# not computing, so on 2 cores 4 processes took half the time of 2. Work is stolen from
# a busy process's queue, so a long test does not leave the others idle at the end. It
# creates databases outbox_tpl_*, outbox_t_*, ... on the server it uses (README.md says
# which); OUTBOX_TEST_PRIVATE_CLUSTER=1 runs it on a cluster of its own.
PYTEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(2 * (os.cpu_count() or 1))')
test: setup chromium pgbouncer promtool verifiers
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal

# The inner loop: the pure tests and the database tests, without browser or slow ones.
test-fast: setup
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m "not browser and not slow" tests/unit tests/db

# A second, independent Standard Webhooks verifier: the npm package, run by Node.js.
verifiers: tests/node/node_modules/.installed

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tests/node --no-audit --no-fund --silent && touch $@; \
	else \
		echo "Node.js is not installed: the npm verifier's tests will be skipped" >&2; \
	fi

# The settings page's browser tests drive Debian's Chromium, never a browser that
# Playwright downloads. Installed here when missing and we are root; else say how.
chromium:
	@test -x /usr/bin/chromium && exit 0; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium >/dev/null || { echo "could not install chromium" >&2; exit 1; }; \
	else \
		echo "the browser tests need Chromium: sudo apt-get install chromium" >&2; exit 1; \
	fi

# Build the Dockerfile with podman and run the image's own files against this machine's
# Postgres and an HTTPS receiver (tests/image/). Needs root; installs podman and
# debootstrap when missing.
OUTBOX_IMAGE ?= localhost/outbox:test
image-test: setup
	tests/image/build.sh $(OUTBOX_IMAGE)
	OUTBOX_IMAGE=$(OUTBOX_IMAGE) $(BIN)/pytest -q tests/image

# The tests behind PgBouncer (transaction mode) start Debian's pgbouncer in front of the
# test database. Installed here when missing and we are root (only the program is
# needed: the service the package sets up is turned off); else those tests skip.
pgbouncer:
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer && exit 0; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's pgbouncer for the tests behind a pooler"; \
		apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			pgbouncer >/dev/null || { echo "could not install pgbouncer" >&2; exit 1; }; \
		systemctl disable --now pgbouncer >/dev/null 2>&1 || true; \
	else \
		echo "the PgBouncer tests will skip: sudo apt-get install pgbouncer" >&2; \
	fi

# The alert rules' unit tests and the dashboard's queries are checked by promtool, from
# Debian's prometheus package. Installed here when missing and we are root (only the
# program is needed: the Prometheus service the package sets up is turned off); else
# those tests skip.
promtool:
	@command -v promtool >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's prometheus for promtool (alert rule tests)"; \
		apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus >/dev/null || { echo "could not install prometheus" >&2; exit 1; }; \
		systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	else \
		echo "the alert rule tests will skip: sudo apt-get install prometheus" >&2; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]' && $(BIN)/python -m bench.run

db-url: setup
	@$(BIN)/python -m tools.localpg url

clean:
	-$(BIN)/python -m tools.localpg stop
	rm -rf $(VENV) .pgdata .mypy_cache .ruff_cache

# Retake docs/settings-webhooks.png (the picture docs/settings-page.md shows), its
# phone-width twin and docs/chat-messages.png.
screenshot: setup chromium
	OUTBOX_UPDATE_SCREENSHOT=1 $(BIN)/pytest -q tests/e2e/test_portal_page.py tests/e2e/test_portal_embed.py tests/e2e/test_chat_preview.py -k "readme_screenshot or chat_preview or phone"
