# The two commands: `make demo` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: install demo test lint serve clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "agentops needs Python 3.11 or newer; set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# DEBUG stays off: its error pages show the settings and the environment. The static
# files are served by the app (agentops.static_files); .env gets a SECRET_KEY.
demo: install
	@$(PY) -m agentops.demo_env .env
	$(PY) manage.py migrate --noinput
	$(PY) manage.py load_demo --base-url http://127.0.0.1:$(PORT)
	$(PY) manage.py serve --port $(PORT) --login "demo / demo-password  (then: Tasks → Reconcile invoices → Run, and approve the email in Approvals; the other two workflows: docs/workflows.md)"

test: install
	$(PY) tests/run.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var
