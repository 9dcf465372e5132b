# Set-up contract: `make run` and `make test` do all set-up on a fresh machine.
# Training, evaluation and benchmarks are separate targets and never part of `make test`.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Training and evaluation read a data folder given on the command line (`make train-vertebrae DATA=...`):
# ct/ (volumes with vertebra labels) and radiographs/ (real AP films with YOLO boxes); see docs/data-needed.md.
DATA ?=
# Debian packages the node and its tests use: dcmtk (storescu/storescp/echoscu), Orthanc (+DICOMweb) as the
# test PACS, Chromium for the viewer and dashboard browser tests.
DEB_PACKAGES := dcmtk orthanc orthanc-dicomweb chromium fonts-dejavu-core openssl

.PHONY: install run test test-fast test-viewer lint bench train-vertebrae train-hardware eval-vertebrae \
        eval-hardware render-docs clean data-given

install: $(STAMP)

$(STAMP): pyproject.toml
	@bash .ci/install-debian.sh $(DEB_PACKAGES)
	# npm fetches the OHIF viewer for tests/viewer once; a NodeSource nodejs already brings its own npm
	@command -v npm >/dev/null || bash .ci/install-debian.sh npm
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch==2.13.0 is pinned in pyproject and installed in the same command: without it monai pulls a CUDA build
	$(PY) -m pip install --disable-pip-version-check -q "torch==2.13.0" -e ".[test]"
	# the OHIF viewer the viewer tests load pages in (npm registry, once, into the git-ignored .viewer/)
	$(PY) tests/viewer/viewer_stack.py >/dev/null
	@touch $(STAMP)

data-given:
	@test -n "$(DATA)" || { echo "make: give the data folder, e.g. make $(MAKECMDGOALS) DATA=/path/to/data (docs/data-needed.md)" >&2; exit 2; }
	@test -d "$(DATA)" || { echo "make: DATA=$(DATA) is not a folder" >&2; exit 2; }

run: install
	$(VENV)/bin/dicom-node serve

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not e2e and not viewer"

test-viewer: install
	$(VENV)/bin/pytest -q -m viewer

lint: install
	$(VENV)/bin/ruff check dicom_node inference reports tests bench
	$(VENV)/bin/mypy dicom_node inference reports bench

bench: install
	$(PY) -m bench.run_all

# Vertebra model: the synthetic cache is rendered once by the data engine (~30 min on 2 cores), then
# training runs <= 2 h at nice 10; checkpoints in ../cache/train-vertebrae make an interrupted run resume.
# Both models and the cache that draws implants onto real films split the real radiographs one way
# (inference.splits); a cache, checkpoint or model of another scheme stops the run with what to do.
# A retrain keeps off what the model it replaces switched off in model.json after its evaluation (level names,
# fracture grades; unassessed complications, unnamed plates), with the reasons: only a person who read the new
# evaluation switches an output back on, by editing model.json.
SPLIT_SCHEME ?= patient-v2
VERTEBRA_CACHE ?= ../cache/synth-v1
# The six-point morphometry stage (heights, fractures) trains last, on lateral DRRs with compression deformities
# (~20 min to render on 2 cores, ~17 min to train on 2 threads).
LATERAL_CACHE ?= ../cache/synth-lat-fractures
train-vertebrae: data-given install
	test -f $(VERTEBRA_CACHE)/manifest.json || nice -n 10 $(PY) -m inference.synth.build --data $(DATA) \
		--out $(VERTEBRA_CACHE) --count 1600 --seed 1 --workers 2 --max-side 768
	nice -n 10 $(PY) -m inference.train.vertebrae --data $(DATA) --cache $(VERTEBRA_CACHE) \
		--work ../cache/train-vertebrae --out inference/models/spine-xr-vertebrae --split-scheme $(SPLIT_SCHEME)
	test -f $(LATERAL_CACHE)/manifest.json || nice -n 10 $(PY) -m inference.synth.build --data $(DATA) \
		--out $(LATERAL_CACHE) --count 900 --seed 31 --views LAT --fracture-prob 0.9 --implants-prob 0.2 --workers 2 --max-side 768
	nice -n 10 $(PY) -m inference.train.endplates --cache $(LATERAL_CACHE) --model inference/models/spine-xr-vertebrae \
		--work ../cache/train-endplates --iterations 2500 --threads 2

# Hardware model: the data engine renders a cache with implants (70 % of DRRs, 40 % implant overlays on real
# radiographs; ~15 min on 2 cores), then the shipped recipe trains 80 min on one thread (so eval-hardware can
# run its two leave-one-patient-out folds side by side with the same recipe) plus ~26 min for the
# complication and disc-space cage classifiers and a few minutes of tuning, at nice 10 (resumable from ../cache/train-hardware).  Screw loosening and breakage
# and cage subsidence are not reported: per implant they measured no better than chance (see the model card).
HARDWARE_CACHE ?= ../cache/synth-hardware-v2
HARDWARE_HOLDOUT ?= ../cache/synth-hardware-holdout-v2
train-hardware: data-given install
	test -f $(HARDWARE_CACHE)/manifest.json || nice -n 10 $(PY) -m inference.synth.build --data $(DATA) \
		--out $(HARDWARE_CACHE) --count 1200 --seed 7 --implants-prob 0.7 --real-prob 0.4 --workers 2 --max-side 768 \
		--split-scheme $(SPLIT_SCHEME)
	nice -n 10 $(PY) -m inference.train.hardware --data $(DATA) --cache $(HARDWARE_CACHE) \
		--work ../cache/train-hardware --out inference/models/spine-xr-hardware --split-scheme $(SPLIT_SCHEME) \
		--threads 1 --max-minutes 80 --patch-iterations 1500 --pos-weight cage:10,plate:10 --disc-iterations 1200 \
		--not-assessed "screw loosening,screw breakage,rod fracture,cage subsidence"

eval-vertebrae: data-given install
	nice -n 10 $(PY) -m inference.evaluate.vertebrae --data $(DATA) --model inference/models/spine-xr-vertebrae \
		--cache $(VERTEBRA_CACHE) --holdout ../cache/synth-holdout-v1 --lopo-work ../cache/lopo-vertebrae \
		--lateral-cache $(LATERAL_CACHE)

eval-hardware: data-given install
	nice -n 10 $(PY) -m inference.evaluate.hardware --data $(DATA) --model inference/models/spine-xr-hardware \
		--cache $(HARDWARE_CACHE) --holdout $(HARDWARE_HOLDOUT) --lopo-work ../cache/lopo-hardware

render-docs: install
	$(PY) -m reports.render_docs --out docs/images

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
