# Every target creates or updates its own virtualenv; nothing depends on what was installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-main test-xla test-lightning-lane soak bench docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_demo.py

test: test-main test-xla

test-main: $(STAMP)
	$(PY) -m pytest -q

test-xla:
	bash scripts/xla-lane.sh

# Lightning's own checkpointing tests (cloned at the installed Lightning's tag) with our plugin injected
test-lightning-lane: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,lightning-lane]'
	PYTHON=$(PY) bash scripts/lightning-lane.sh

soak: $(STAMP)
	$(PY) -m pytest -q -m soak tests

bench: $(STAMP)
	$(PY) -m benchmarks --out bench-out

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site bench-out demo-ckpts
