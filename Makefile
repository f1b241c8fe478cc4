# Two entry points for a fresh machine: `make demo` and `make test`. Each bootstraps .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo-output
SHARED_WEIGHTS ?= ../shared/weights/tf_efficientnet_lite0_imagenet.safetensors

.PHONY: venv demo test lint imports clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision first, pinned: these wheels install from the local disk here
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	FAKESCOPE_CACHE_DIR=$(DEMO_DIR)/cache SHARED_WEIGHTS=$(SHARED_WEIGHTS) DEMO_DIR=$(DEMO_DIR) \
		bash scripts/demo.sh

# the browser test drives Debian's chromium + chromium-driver; installed here when missing and root
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
				echo "chromium could not be installed: the browser test will skip"; \
		else echo "chromium is missing and this is not root: the browser test will skip"; fi

test: venv browser
	FAKESCOPE_PROGRESS=0 $(PY) -m pytest -q

lint: venv imports
	$(VENV)/bin/ruff check src tests benchmarks

# the layers of the package ([tool.importlinter] in pyproject.toml): each layer imports only downwards
imports: venv
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
