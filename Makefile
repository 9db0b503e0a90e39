# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output
DEMO_STEPS ?= 200

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
	rm -rf $(DEMO_DIR)/run
	$(BIN)/cp2image-tf fit $(DEMO_DIR)/tfrecords $(DEMO_DIR)/run --steps $(DEMO_STEPS) \
		--batch-size 28 --validate-every 100 --checkpoint-every 100 --log-every 10
	@echo
	@echo "Demo outputs:"
	@echo "  sample data (TIFFs, masks, CellProfiler CSVs): $(DEMO_DIR)/sample"
	@echo "  TFRecord shards and manifest.json:             $(DEMO_DIR)/tfrecords"
	@echo "  trained model, history.csv, TensorBoard logs:  $(DEMO_DIR)/run"
	@echo "  real vs generated validation cells:            $(DEMO_DIR)/run/samples/latest.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/python benchmarks/bench_input.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_measure.py

clean:
	rm -rf $(DEMO_DIR)
