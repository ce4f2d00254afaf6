# Finetune Platform — the two commands are `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
SWIFT_VENV ?= .venv-swift
# The CPU build of torch; on a GPU host set the CUDA build, e.g. TORCH_SPEC="torch==2.13.0" with the
# matching index, before `make install`.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install run worker web test browser lint format check bench-overhead bench-dispatch bench-live bench-gateway clean

install: $(VENV)/.installed $(SWIFT_VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

$(SWIFT_VENV)/.installed: requirements-swift.txt
	$(PYTHON) -m venv $(SWIFT_VENV)
	$(SWIFT_VENV)/bin/pip install -q --upgrade pip
	$(SWIFT_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(SWIFT_VENV)/bin/pip install -q -r requirements-swift.txt
	touch $@

## Run the platform on 127.0.0.1:8000: daphne (web + WebSockets) and this host's worker.
run: install
	$(VENV)/bin/python manage.py migrate --noinput -v0
	$(VENV)/bin/python manage.py collectstatic --noinput -v0
	HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/python scripts/run.py

## Only the worker (django-q2 cluster) of this host, e.g. on an extra GPU host.
worker: install
	$(VENV)/bin/python manage.py migrate --noinput -v0
	$(VENV)/bin/python manage.py worker

## Only the web server.
web: install
	$(VENV)/bin/python manage.py migrate --noinput -v0
	$(VENV)/bin/python manage.py collectstatic --noinput -v0
	$(VENV)/bin/daphne -b $(HOST) -p $(PORT) finetune_platform.asgi:application

## Run the checks and the whole test suite (DATABASE_URL / REDIS_URL pick PostgreSQL / Redis).
## Browser tests (Playwright, sync API) run in a process of their own, after the rest.
test: install check browser
	$(VENV)/bin/python -m pytest -m "not e2e" $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest -m e2e $(PYTEST_ARGS)

## Debian's Chromium for the browser tests (Playwright never downloads a browser here).
browser:
	@test -x /usr/bin/chromium || { echo "Installing Debian's chromium for the browser tests"; \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  { echo "Could not install chromium; run: sudo apt-get install -y chromium"; exit 1; }; }

check:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/python manage.py check
	$(VENV)/bin/python manage.py makemigrations --check --dry-run
	$(VENV)/bin/python manage.py spectacular --validate --fail-on-warn --file /dev/null

lint: check

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## Benchmarks (bench/): each prints its figures; DATABASE_URL picks PostgreSQL (use a scratch database).
bench-overhead: install
	$(VENV)/bin/python bench/overhead.py

bench-dispatch: install
	$(VENV)/bin/python bench/dispatch.py

bench-live: install
	$(VENV)/bin/python bench/live.py

bench-gateway: install
	$(VENV)/bin/python bench/gateway.py

clean:
	rm -rf $(VENV) $(SWIFT_VENV)
