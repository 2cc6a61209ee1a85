# slicebridge: every target does its own set-up; re-running reuses the envs.
#   make test    build both envs, run the test suite
#   make demo    build both envs, run the main job on a small embedded model
#   make bench   build both envs, run the benchmarks into bench/results/
#   make families  the family matrix (family x operation x loader, NMSE vs the official logits)
#   make gpu-dry-run  the GPU check's dry run on the CPU (on the GPU machine: bash bench/gpu_check.sh)
#   make convert SLICEGPT_MODEL=... [BASE_MODEL=...] [OUTPUT=...] [ENV=slicegpt]
#   make convert SWEEP=dir [OUTPUT_DIR=...] [ENV=slicegpt]
#                convert through a detached warm server that later make calls reuse
#   make slice BASE_MODEL=dir SPARSITIES="0.2 0.25 0.3" CALIBRATION=file OUTPUT_DIR=dir [ENV=slicegpt]
#              [OVERWRITE=1] [CONVERT=1] [EXPORT=1] [VERIFY=1] [SLICE_ARGS="--dtype fp32 ..."]
#                slice the dense model at each sparsity, as run_slicegpt does, through that warm server
#                (CAL_DATASET=wikitext2 instead of CALIBRATION; SLICE_ARGS: more `slicebridge slice` flags)

PYTHON   ?= python3.11
ENVS     ?= .envs
BASE     := $(ENVS)/base
SLICEGPT := $(ENVS)/slicegpt
PIP      := pip install --quiet --disable-pip-version-check
PYTEST_ARGS ?=
# The slicegpt env for `make convert` and `make slice`: a conda env name, a prefix or a python. Default: the
# stand-in env this Makefile builds (no slicegpt in it: the builtin loader is used).
ENV      ?= $(SLICEGPT)
SB       := $(BASE)/bin/slicebridge

export SLICEBRIDGE_TEST_SLICEGPT_ENV := $(abspath $(SLICEGPT))

.PHONY: envs test demo bench families gpu-dry-run convert slice stop clean-envs

envs: $(BASE)/.ready $(SLICEGPT)/.ready

# The base env: the package installed editable, the latest transformers.
$(BASE)/.ready: requirements/base-env.txt pyproject.toml
	@echo "== base env: $(BASE)"
	test -x $(BASE)/bin/python || $(PYTHON) -m venv $(BASE)
	$(BASE)/bin/$(PIP) -r requirements/base-env.txt
	$(BASE)/bin/$(PIP) -e .
	touch $@

# The stand-in slicegpt env: a second interpreter with the official package's pins.
# slicebridge is NOT installed here: the server bootstraps its code in.
$(SLICEGPT)/.ready: requirements/slicegpt-env.txt
	@echo "== stand-in slicegpt env: $(SLICEGPT)"
	test -x $(SLICEGPT)/bin/python || $(PYTHON) -m venv $(SLICEGPT)
	$(SLICEGPT)/bin/$(PIP) -r requirements/slicegpt-env.txt
	touch $@

test: envs
	$(BASE)/bin/python -m pytest $(PYTEST_ARGS)

demo: envs
	$(BASE)/bin/python -m slicebridge.client.cli demo --env $(SLICEGPT)

bench: envs
	$(BASE)/bin/python bench/run.py --env $(SLICEGPT)

families: envs
	$(BASE)/bin/python bench/family_matrix.py --env $(SLICEGPT)

# The GPU check (bench/gpu_check.sh) on the CPU with tiny models: the tests run it too. On the GPU machine,
# which has no network, run bench/gpu_check.sh itself: it makes its envs from bench/gpu_prepare.sh's wheels.
gpu-dry-run: envs
	bash bench/gpu_check.sh --cpu-dry-run $(OUTPUT_DIR)

convert: envs
	@if [ -z "$(SLICEGPT_MODEL)$(SWEEP)" ]; then \
	  echo "usage: make convert SLICEGPT_MODEL=ckpt.pt [BASE_MODEL=dir] [OUTPUT=out.bin] [ENV=slicegpt]"; \
	  echo "       make convert SWEEP=dir [OUTPUT_DIR=dir] [ENV=slicegpt]"; exit 2; fi
	@$(SB) server start --env "$(ENV)" >/dev/null
	$(SB) convert --env "$(ENV)" --overwrite-flag OVERWRITE=1 \
	  $(if $(SLICEGPT_MODEL),--slicegpt_model "$(SLICEGPT_MODEL)") $(if $(SWEEP),"$(SWEEP)") \
	  $(if $(BASE_MODEL),--base_model "$(BASE_MODEL)") $(if $(OUTPUT),--output "$(OUTPUT)") \
	  $(if $(OUTPUT_DIR),--output-dir "$(OUTPUT_DIR)") $(if $(OVERWRITE),--overwrite) $(if $(VERIFY),--verify)

slice: envs
	@if [ -z "$(BASE_MODEL)" ] || [ -z "$(SPARSITIES)" ] || [ -z "$(OUTPUT_DIR)" ] || [ -z "$(CALIBRATION)$(CAL_DATASET)" ]; then \
	  echo "usage: make slice BASE_MODEL=dir SPARSITIES=\"0.2 0.25 0.3\" CALIBRATION=file OUTPUT_DIR=dir [ENV=slicegpt]"; \
	  echo "       [OVERWRITE=1] [CONVERT=1] [EXPORT=1] [VERIFY=1] [SLICE_ARGS=\"--dtype fp32 ...\"]"; \
	  echo "       (CAL_DATASET=wikitext2 instead of CALIBRATION; SLICE_ARGS: more \`slicebridge slice\` flags)"; \
	  exit 2; fi
	@$(SB) server start --env "$(ENV)" >/dev/null
	$(SB) slice --env "$(ENV)" --overwrite-flag OVERWRITE=1 --model-path "$(BASE_MODEL)" --save-dir "$(OUTPUT_DIR)" \
	  --sparsity $(SPARSITIES) $(if $(CALIBRATION),--calibration "$(CALIBRATION)") \
	  $(if $(CAL_DATASET),--cal-dataset "$(CAL_DATASET)") $(if $(OVERWRITE),--overwrite) \
	  $(if $(CONVERT),--convert) $(if $(EXPORT),--export) $(if $(VERIFY),--verify) $(SLICE_ARGS)

# Stop the detached server that `make convert` or `make slice` started.
stop:
	-$(SB) server stop --env "$(ENV)"

clean-envs:
	rm -rf $(ENVS)
