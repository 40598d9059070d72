# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
PORT ?= 8080

.PHONY: help setup demo test lint format test-unit test-integration test-e2e test-deploy kube-apiserver \
	test-packages vllm bench bench-quick bench-usage fuzz soak image clean

help:
	@echo "make demo [TOPOLOGY=one-hop] - set up and run the local stack (Envoy on 127.0.0.1:$(PORT)) in the foreground"
	@echo "make test   - set up (venv, packages, kube-apiserver, vLLM, the image), then lint + all tests"
	@echo "make lint   - ruff check, ruff format --check, mypy"
	@echo "make bench [ARGS='--quick --only NAME'] - policy plane vs its do-nothing floor (docs/performance.md)"
	@echo "make bench-quick - the same, small (under a minute)"
	@echo "make bench-usage [ARGS=--quick] - measure the usage readers (docs/usage-accounting.md)"
	@echo "make test-unit | test-integration (with tests/k8s) | test-e2e | test-deploy - one test tier"
	@echo "make fuzz [CALLS=N] - the gRPC fuzzer's long run against both servers (default 1e6)"
	@echo "make soak [MINUTES=10] [TOPOLOGY=one-hop] - mixed traffic through Envoy, memory and fds sampled (docs/operations.md)"
	@echo "make image [BASE=IMAGE] - build localhost/maas-gateway:VERSION with podman (docs/deploy.md)"

setup:
	@scripts/setup-dev.sh

kube-apiserver:
	@scripts/provision-kube-apiserver.sh >/dev/null

test-packages:
	@scripts/install-test-packages.sh

vllm:
	@scripts/provision-vllm.sh >/dev/null

# mixed traffic through Envoy for MINUTES, RSS and file descriptors per process (not in CI)
MINUTES ?= 10
TOPOLOGY ?= two-hop
soak: setup
	$(PY) -m bench.soak --minutes $(MINUTES) --topology $(TOPOLOGY)

# the Containerfile built with podman; FROM a local Debian base unless BASE names an image
image:
	@BASE=$(BASE) scripts/build-image.sh

demo: setup
	$(PY) -m maas_demo --port $(PORT) --topology $(TOPOLOGY)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: setup test-packages kube-apiserver vllm image lint
	$(PY) -m pytest

test-unit: setup test-packages
	$(PY) -m pytest tests/unit

test-integration: setup test-packages kube-apiserver
	$(PY) -m pytest tests/integration tests/k8s

test-e2e: setup test-packages vllm
	$(PY) -m pytest tests/e2e

test-deploy: setup test-packages kube-apiserver image
	$(PY) -m pytest tests/deploy

bench: setup test-packages kube-apiserver
	$(PY) -m bench $(ARGS)

bench-quick: setup test-packages kube-apiserver
	$(PY) -m bench --quick $(ARGS)

bench-usage: setup
	$(PY) -m bench.usage $(ARGS)

# the gRPC fuzzer's long run (CI runs 10,000 calls per server with the tests)
CALLS ?= 1000000
fuzz: setup test-packages
	MAAS_FUZZ_CALLS=$(CALLS) $(PY) -m pytest -s tests/integration/test_fuzz_grpc.py

clean:
	rm -rf .venv .demo .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
