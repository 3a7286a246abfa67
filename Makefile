# segcompress: two commands for users (see README.md).
#   make run   set up .venv if needed, then run the default benchmark (snakemake on config.yaml)
#   make test  set up .venv if needed, then run the test suite
# CORES (default: all) and SNAKEMAKE_ARGS pass through to snakemake. `make run` prints progress,
# not every job's block (--quiet rules): each job's command is the first line of its log under
# logs/, and a failed job's log is printed (the profile's show-failed-logs).

PYTHON ?= python3
VENV ?= .venv
CORES ?= all
SNAKEMAKE_ARGS ?=
BIN := $(VENV)/bin
# Snakemake loads profiles/default/ (beside the Snakefile) by itself: make adds nothing to it.
SNAKEMAKE := $(BIN)/snakemake
STAMP := $(VENV)/.segcompress-installed

.PHONY: venv run test test-fast dry-run lint clean-results

venv: $(STAMP)

# torch first and alone: pinned 2.13.0 takes the local CPU wheel on a CPU-only machine and the
# CUDA build elsewhere; every later install is constrained so it never replaces it.
# The rest with uv (pinned, installed by pip beside torch): the same pins, resolved and installed
# in ~40 s instead of pip's ~150 s. uv reads no pip.conf, so where it cannot reach its index
# (a pip mirror or find-links only) pip installs the same files instead.
# Bytecode is compiled at install (uv --compile-bytecode, pip by default): with
# PYTHONDONTWRITEBYTECODE set (as on this project's build machines) no job would ever write it,
# and each would recompile torch.
$(STAMP): envs/requirements.txt envs/constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0 setuptools==81.0.0 uv==0.13.8
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -c envs/constraints.txt -r envs/requirements.txt \
		|| $(BIN)/python -m pip install --quiet -c envs/constraints.txt -r envs/requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m segcompress._import_hooks install
	$(BIN)/python -m pip check
	touch $@

run: venv
	$(SNAKEMAKE) --quiet rules --cores $(CORES) $(SNAKEMAKE_ARGS)

dry-run: venv
	$(SNAKEMAKE) -n --cores $(CORES) $(SNAKEMAKE_ARGS)

lint: venv
	$(SNAKEMAKE) --lint

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The unit tests only (no end-to-end study runs): a few minutes
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-results:
	rm -rf results
