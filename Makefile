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

# The end-to-end benchmark (bench/e2e.py, README "Performance"): sixgate beside TAYGA and the
# kernel on this machine. Needs root; bench/bootstrap.sh adds tayga, gcc and matplotlib.
.PHONY: bench bench-quick fuzz soak

bench: bootstrap
	@bash bench/bootstrap.sh
	.venv/bin/python -m bench.e2e

bench-quick: bootstrap
	@bash bench/bootstrap.sh
	.venv/bin/python -m bench.e2e --quick

# 10 million mutated protocol-41 packets through the engine; internal_error must stay 0
# (CI runs 100k of them, tests/property/test_fuzz_smoke.py).
fuzz: bootstrap
	.venv/bin/python -m bench.fuzz

# The real gateway under sustained floods (SYN, fragments, 2x overload) for 60 s each while a
# real client downloads 10 MB, beside the kernel's conntrack under the same SYN flood
# (CI runs 2 s of each, tests/test_soak_smoke.py). Needs root.
soak: bootstrap
	@bash bench/bootstrap.sh
	.venv/bin/python -m bench.soak
