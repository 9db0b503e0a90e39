# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output
DEMO_STEPS ?= 400

.PHONY: demo test browser venv bench clean readme-figure

venv: $(STAMP)

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cp2image-tf sample-data $(DEMO_DIR)/sample --overwrite
	$(BIN)/cp2image-tf convert $(DEMO_DIR)/sample/cellprofiler $(DEMO_DIR)/tfrecords \
		--objects Nuclei,Cells --channels DNA,Tubulin,Actin --split-by Metadata_Plate,Metadata_Well --overwrite
	$(BIN)/cp2image-tf inspect $(DEMO_DIR)/tfrecords --verify
	rm -rf $(DEMO_DIR)/run
	$(BIN)/cp2image-tf fit $(DEMO_DIR)/tfrecords $(DEMO_DIR)/run --steps $(DEMO_STEPS) \
		--validate-every 200 --checkpoint-every 200 --log-every 10
	rm -rf $(DEMO_DIR)/models
	$(BIN)/cp2image-tf export $(DEMO_DIR)/run $(DEMO_DIR)/models/cp2image
	$(BIN)/cp2image-tf generate $(DEMO_DIR)/models/cp2image $(DEMO_DIR)/generate \
		--treatment-mean all --data $(DEMO_DIR)/tfrecords --overwrite
	$(BIN)/cp2image-tf traverse $(DEMO_DIR)/models/cp2image $(DEMO_DIR)/traverse \
		--feature Nuclei_AreaShape_Area --feature Cells_AreaShape_Area \
		--feature Cells_Intensity_MeanIntensity_Actin --interpolate DMSO NucEnlarge \
		--data $(DEMO_DIR)/tfrecords --overwrite
	$(BIN)/cp2image-tf evaluate $(DEMO_DIR)/models/cp2image $(DEMO_DIR)/tfrecords \
		$(DEMO_DIR)/evaluate --max-cells 70 --reference-cells 1000 --train-cells 300 \
		--moa-column Metadata_MoA --overwrite --quiet
	@echo
	@echo "Demo outputs:"
	@echo "  sample data (TIFFs, masks, CellProfiler CSVs): $(DEMO_DIR)/sample"
	@echo "  TFRecord shards and manifest.json:             $(DEMO_DIR)/tfrecords"
	@echo "  trained model, history.csv, TensorBoard logs:  $(DEMO_DIR)/run"
	@echo "  real vs generated validation cells:            $(DEMO_DIR)/run/samples/latest.png"
	@echo "  SavedModel for TensorFlow Serving:             $(DEMO_DIR)/models/cp2image/1"
	@echo "  each treatment's mean profile, drawn:          $(DEMO_DIR)/generate/montage.png"
	@echo "  three features traversed, DMSO -> NucEnlarge:  $(DEMO_DIR)/traverse/traverse.png"
	@echo "  re-measured features vs the input, baselines:  $(DEMO_DIR)/evaluate/report.md"
	@echo "  real | generated | nearest neighbour:          $(DEMO_DIR)/evaluate/overview.png"
	@echo
	@echo "Explore the model in a browser (then open http://127.0.0.1:8080):"
	@echo "  $(BIN)/cp2image-tf explore $(DEMO_DIR)/models/cp2image --data $(DEMO_DIR)/tfrecords"

# Every test runs: the real-browser tests (tests/test_explore_browser.py) need Debian's chromium
# and chromium-driver, installed here when missing (as root, or with sudo that asks no
# password); otherwise make stops and names the command. The tests fail, not skip, without them.
BROWSER_PACKAGES := chromium chromium-driver
APT_INSTALL := apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(BROWSER_PACKAGES)

test: $(STAMP) browser
	CP2IMAGE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q tests

browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "make test: the browser tests need /usr/bin/chromium and /usr/bin/chromedriver" \
		     "(Debian/Ubuntu: apt-get install $(BROWSER_PACKAGES)); install them and run make test again." >&2; \
		exit 1; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Installing $(BROWSER_PACKAGES) for the browser tests"; sh -c '$(APT_INSTALL)'; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		echo "Installing $(BROWSER_PACKAGES) for the browser tests"; sudo sh -c '$(APT_INSTALL)'; \
	else \
		echo "make test: the browser tests need chromium and chromedriver; run" >&2; \
		echo "  sudo sh -c '$(APT_INSTALL)'" >&2; \
		echo "then make test again." >&2; \
		exit 1; \
	fi

# The README's picture (docs/demo.png: real | generated | nearest neighbour per treatment) and
# its demo figures (the block between <!-- demo-figures --> markers), both from the demo's
# evaluate (run make demo first, with the same DEMO_DIR).
readme-figure:
	@test -f $(DEMO_DIR)/evaluate/overview.png || { echo "make readme-figure:" \
		"$(DEMO_DIR)/evaluate/overview.png is missing; run make demo first." >&2; exit 1; }
	mkdir -p docs
	cp $(DEMO_DIR)/evaluate/overview.png docs/demo.png
	$(PYTHON) scripts/readme_demo.py $(DEMO_DIR)/evaluate/report.json README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/python benchmarks/bench_input.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_measure.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_explore.py

clean:
	rm -rf $(DEMO_DIR)
