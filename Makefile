# The two commands README promises on a fresh Debian machine.
.PHONY: demo test lint install

install:
	bash .ci/install

test: install
	.venv/bin/pytest

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# Boots the test guest on the native runtime with its console here; grows into the all-in-one
# control-plane demo as the compute node and API land.
demo: install
	.venv/bin/python -m native.run --kernel "$$(.venv/bin/python -m native.testguest)" \
		--vcpus 2 --memory 128 --cmdline "ready smp memtest=8 poweroff"
