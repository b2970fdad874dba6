# The two commands of the README: `make demo` (the main job on an embedded
# default) and `make test` (the test suite). Each creates .venv on first use
# and installs what it needs, with torch pinned through constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[test,triton,onnx,openvino,plot,train,native]'
	# Build the 'direct' HetConv CPU kernel now (about 30 s) rather than in the first call; where it
	# cannot be built, one warning says why and leanconv uses the library forms.
	$(BIN)/python -c "from leanconv.ops import hetconv_direct; hetconv_direct.available()"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/leanconv compare

test: $(STAMP)
	$(BIN)/python -m pytest

# The fast lane for daily work: everything but the tests marked slow (under 3 minutes on 2 cores).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
