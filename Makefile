# The two commands a newcomer needs: `make run` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup run test lint format bench clean db-url

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
	@url=$$($(BIN)/python -m outbox.localpg url) || exit 1; \
	export OUTBOX_DATABASE_URL="$$url"; \
	$(BIN)/outbox migrate || exit 1; \
	echo; \
	echo "outbox is starting on $$url"; \
	echo "In another terminal, try:"; \
	echo "  export OUTBOX_DATABASE_URL='$$url'"; \
	echo "  .venv/bin/outbox webhooks add --account acct_1 --name 'CRM Sync' --event lead.scored \\"; \
	echo "      --url https://example.com/webhooks --secret 'a-signing-secret-of-16+-chars'"; \
	echo "  .venv/bin/outbox emit acct_1 lead.scored '{\"lead\": {\"id\": 42}, \"score\": {\"overall\": 87}}'"; \
	echo "  .venv/bin/outbox status"; \
	echo "  curl http://127.0.0.1:8080/healthz"; \
	echo "Stop with Ctrl-C."; \
	echo; \
	exec $(BIN)/outbox run

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

db-url: setup
	@$(BIN)/python -m outbox.localpg url

clean:
	-$(BIN)/python -m outbox.localpg stop
	rm -rf $(VENV) .pgdata .mypy_cache .ruff_cache
