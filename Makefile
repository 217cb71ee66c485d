# Loopwise: `make demo` runs the main job from scratch, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps demo test test-unit lint format bench bench-ope bench-fuzz bench-soak bench-faults bench-profile bench-serving bench-learner bench-scale clean

install: system-deps $(STAMP)  ## create .venv/ with the `loopwise` command and dev tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's redis-server; Debian's chromium (headless: the replay report's screenshot test);
# Java 17 and Maven fetch and run the Kafka broker (jars from Maven Central).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing Debian's redis-server"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null && \
	  { $(SUDO) service redis-server stop >/dev/null 2>&1 || true; }; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
	@command -v java >/dev/null 2>&1 || { echo "Java 17+ is required to run the Kafka broker (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn  >/dev/null 2>&1 || { echo "Maven is required to fetch the Kafka broker's jars (apt-get install maven)"; exit 1; }

demo: install  ## infra up, worker, simulated traffic, summary of what landed in Redis
	$(BIN)/loopwise demo

test: install  ## unit + integration tests (starts its own Kafka broker and Redis on free ports)
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

# mypy reads the installed layout (streams/ as loopwise/streams/ ...): a copy in .lint/site.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf .lint && $(BIN)/pip install -q --no-deps --no-build-isolation --target .lint/site .
	rm -rf build
	cd .lint/site && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p loopwise

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install  ## end-to-end throughput: worker vs raw consumption ceiling
	$(BIN)/python -m bench.bench_worker

bench-ope: install  ## replay throughput on a 1M-record log vs a per-record Python loop (~12 min)
	$(BIN)/python -m bench.bench_ope

bench-fuzz: install  ## 1M hostile messages through the real worker, every count reconciled (~12 min)
	$(BIN)/python -m bench.bench_fuzz

bench-soak: install  ## worker RSS and Redis memory under 20 minutes of steady traffic, plot
	$(BIN)/python -m bench.bench_soak --minutes 20

bench-faults: install  ## worker SIGKILLs, broker and Redis kill -9, poison input, learning loop on: what was lost (~12 min)
	$(BIN)/python -m bench.bench_faults

bench-profile: install  ## the worker under py-spy over 200k events: CPU µs per event per stage, full loop and state only (~7 min)
	$(BIN)/python -m bench.bench_profile
	$(BIN)/python -m bench.bench_profile --state-only

bench-serving: install  ## GET nba:{user} latency from a separate client under the worker's load vs a bare GET of its size (~2 min)
	$(BIN)/python -m bench.bench_serving

bench-learner: install  ## the learner's examples/s vs VW's own C++ driver on the same 20k logged examples (~3 min)
	$(BIN)/python -m bench.bench_learner

bench-scale: install  ## events/s with 1, 2, 3 workers (user state, full loop); snapshot -> every worker deciding with it (~7 min)
	$(BIN)/python -m bench.bench_scale

clean:
	rm -rf $(VENV) state .lint build .pytest_cache .mypy_cache .ruff_cache
