# The README's two commands. Both set up first (idempotent, seconds when already set up).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test:
	@EXTRAS=dev,train bash scripts/setup.sh
	.venv/bin/python -m pytest
