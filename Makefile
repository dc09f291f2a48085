# The two commands README promises on a fresh Debian machine.
.PHONY: test lint install

install:
	bash .ci/install

test: install
	.venv/bin/pytest

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
