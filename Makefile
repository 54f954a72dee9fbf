# Benchmarks (bench/run_all.py): one benchmark process at a time, figures into bench/RESULTS.md.
PYTHON ?= .venv/bin/python
# Extra driver options, e.g. make bench ARGS="--only moe_layer --only serve_decode"
ARGS ?=

.PHONY: bench bench-quick

# Every performance benchmark (about 9 minutes on 2 cores); rewrites bench/RESULTS.md.
bench:
	$(PYTHON) bench/run_all.py $(ARGS)

# A smoke run of the same benchmarks at small sizes on 1 thread (about 2 minutes); writes nothing.
bench-quick:
	$(PYTHON) bench/run_all.py --quick $(ARGS)
