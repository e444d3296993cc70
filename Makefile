# Two commands do everything on a machine with python3 and make:
#   make serve   build the environment and the demo catalog if missing, serve on 127.0.0.1:8000
#   make test    build the environment if missing, lint, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= data/demo
DEMO := $(DEMO_DIR)/items.parquet
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint demo bench bench-chunks clean tools

setup: $(STAMP) tools

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ./client -e '.[test]'
	touch $(STAMP)

demo: $(DEMO)

$(DEMO): | $(STAMP)
	$(BIN)/terrazzo demo -o $(DEMO_DIR)

serve: $(STAMP) $(DEMO)
	$(BIN)/terrazzo serve --catalog $(DEMO) --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# System tools the tests drive, from Debian's packages: Chromium for the viewer (playwright uses
# the system browser, no download), docker-compose and nginx to parse the deployment files,
# promtool to lint /metrics (Debian's prometheus package, without the node exporter daemon it
# recommends: the server is never started).
TOOLS := chromium docker-compose nginx
tools:
	@missing=$$(for t in $(TOOLS); do command -v $$t >/dev/null 2>&1 || echo $$t; done); \
	pkgs=$$(echo $$missing | sed 's/nginx/nginx-light/'); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs; \
	  else echo "the tests need: sudo apt-get install $$pkgs" >&2; fi; fi
	@if ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus; \
	  else echo "the tests need: sudo apt-get install --no-install-recommends prometheus" >&2; \
	  fi; fi

# two passes: the suite on two workers (a test file stays on one: some files check their own
# earlier results), then the tests whose timing bars must not share the machine
test: lint tools
	$(BIN)/pytest -q -n 2 --dist loadfile -m "not serial" --durations=20
	$(BIN)/pytest -q -m serial

bench: $(STAMP) $(DEMO)
	$(BIN)/python -m bench.tiles --catalog $(DEMO)

bench-chunks: $(STAMP) $(DEMO)
	$(BIN)/python -m bench.chunks --catalog $(DEMO)

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
