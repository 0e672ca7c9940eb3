# Thin targets; CI calls them as written.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Without a GPU, the CPU build of torch: a local wheel when pip's find-links has one,
# else PyTorch's CPU index (an unpinned torch from the default index is a multi-GB CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SPEC ?= examples/medical-terms.yaml
CMI_VENV ?= .venv-cmi
LINT_VENV ?= .venv-lint
CMI_TRANSFORMERS ?= 4.51.3

.PHONY: install compat brokers browsers database lint-deploy run test test-unit test-e2e lint format up down clean docs bench reliability

install: $(VENV)/.installed

# Install torch $(TORCH_VERSION) with the pip given as $(1): the CUDA build with a GPU, else
# the CPU build (a local wheel when pip's find-links has one, else PyTorch's CPU index).
define install_torch
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU found: CUDA build of torch $(TORCH_VERSION)"; \
	  $(1) install -q "torch==$(TORCH_VERSION)"; \
	elif $(1) install -q --no-index --no-deps "torch==$(TORCH_VERSION)+cpu" 2>/dev/null; then \
	  echo "no GPU: CPU build of torch $(TORCH_VERSION) from a local wheel"; \
	  $(1) install -q "torch==$(TORCH_VERSION)+cpu"; \
	else \
	  echo "no GPU: CPU build of torch $(TORCH_VERSION) from $(TORCH_CPU_INDEX)"; \
	  $(1) install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
endef

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(call install_torch,$(PIP))
	$(PIP) install -q -e '.[dev]'
	touch $@

# An isolated environment with the transformers version AWS documents for Custom Model
# Import: the tests load every export there (tests/unit/services/test_publisher.py).
compat: $(CMI_VENV)/.installed

$(CMI_VENV)/.installed:
	test -x $(CMI_VENV)/bin/python || python3 -m venv $(CMI_VENV)
	$(call install_torch,$(CMI_VENV)/bin/python -m pip)
	$(CMI_VENV)/bin/python -m pip install -q "transformers==$(CMI_TRANSFORMERS)" sentencepiece
	touch $@

run: install
	$(VENV)/bin/termtune run $(SPEC)

# The whole suite on PostgreSQL (a private server the tests start; SQLite, the embedded
# default, is what `make run` uses and what the ledger's own tests also cover).
test: install compat brokers browsers database
	TERMTUNE_TEST_DATABASE=postgresql $(VENV)/bin/pytest

test-unit: install compat
	$(VENV)/bin/pytest tests/unit

test-e2e: install brokers browsers database
	TERMTUNE_TEST_DATABASE=postgresql $(VENV)/bin/pytest tests/e2e

lint: install lint-deploy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The deployment, checked without a Docker engine: Dockerfiles (hadolint), compose files
# against the Compose specification's schema, CloudFormation (cfn-lint, checkov). The tools
# live in their own environment: checkov's pins would fight the services'.
lint-deploy: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/hadolint services/*/Dockerfile
	$(LINT_VENV)/bin/python deploy/lint/compose_schema.py docker-compose.yml deploy/compose.cpu.yml
	$(LINT_VENV)/bin/cfn-lint deploy/aws/termtune.yaml
	$(LINT_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation \
	  -f deploy/aws/termtune.yaml

$(LINT_VENV)/.installed: deploy/lint/requirements.txt
	test -x $(LINT_VENV)/bin/python || python3 -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q -r deploy/lint/requirements.txt
	touch $@

# Chromium and its driver from Debian, for the web page's end-to-end test.
browsers:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver (Debian packages)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; }

# RabbitMQ from Debian for the integration tests (they start and stop a private node).
brokers:
	@command -v rabbitmq-server >/dev/null 2>&1 || test -x /usr/lib/rabbitmq/bin/rabbitmq-server || { \
	  echo "installing rabbitmq-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q rabbitmq-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q rabbitmq-server >/dev/null; }; }

# PostgreSQL from Debian for the tests (they start and stop a private server).
database:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing postgresql (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q postgresql >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q postgresql >/dev/null; }; }

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

up: install
	$(VENV)/bin/termtune up

down:
	$(VENV)/bin/termtune down

clean:
	rm -rf var

docs: install
	$(PY) -c "from services.cli.docs import update_readme; update_readme()"

bench: install
	$(PY) -m bench.report

# Every fault scenario at full size; docs/reliability.md from what they counted and timed.
reliability: install brokers database
	TERMTUNE_TEST_DATABASE=postgresql TERMTUNE_RELIABILITY_SIZE=full TERMTUNE_RELIABILITY_REPORT=docs/reliability.md \
		$(VENV)/bin/pytest -q -p no:cacheprovider --timeout 14400 tests/reliability
