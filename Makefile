# The two commands of README.md: `make demo` (the gateway in a namespace lab, driven by real
# ping/curl/dig) and `make test` (the whole suite). Both install what they need first.
.PHONY: bootstrap demo test lint

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/python -m tests.lab.demo

test: bootstrap
	.venv/bin/python -m pytest -p no:cacheprovider tests

lint: bootstrap
	.venv/bin/python -m ruff check . && .venv/bin/python -m mypy
