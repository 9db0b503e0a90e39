# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cp2image-tf sample-data $(DEMO_DIR)/sample --overwrite
	$(BIN)/cp2image-tf convert $(DEMO_DIR)/sample/cellprofiler $(DEMO_DIR)/tfrecords \
		--objects Nuclei,Cells --channels DNA,Tubulin,Actin --split-by Metadata_Plate,Metadata_Well --overwrite
	$(BIN)/cp2image-tf inspect $(DEMO_DIR)/tfrecords --verify
	@echo
	@echo "Demo outputs:"
	@echo "  sample data (TIFFs, masks, CellProfiler CSVs): $(DEMO_DIR)/sample"
	@echo "  TFRecord shards and manifest.json:             $(DEMO_DIR)/tfrecords"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/python benchmarks/bench_input.py

clean:
	rm -rf $(DEMO_DIR)
