# The two commands of the README. Both install what they need first (idempotent, quick when done).
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0

.PHONY: install test demo

install:
	@command -v dot >/dev/null 2>&1 || { echo "installing graphviz (dot)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq graphviz >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq graphviz >/dev/null; fi; } \
	  || echo "warning: could not install graphviz; drawings fall back to .dot files"
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium (viewer tests)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; } \
	  || echo "warning: could not install chromium; the viewer's browser tests will be skipped"
	$(PYTHON) -m pip install -q "$(TORCH_PIN)"
	$(PYTHON) -m pip install -q -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) -m edgeprune demo
