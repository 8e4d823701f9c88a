# Two commands on a fresh machine: `make run` and `make test`. Both install what is missing first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch: kept when the venv already has one (a GPU user's build), else the pinned CPU build.
# Elsewhere than this machine, add TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid a CUDA download.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
OUT     ?= out
# llama-cpp-python builds from source (~7 min, then pip's wheel cache keeps it); portable CPU flags.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install run test reference-model synthetic interop clean

# Quiet by default: one line per step, the whole log in $(INSTALL_LOG) (its tail is shown when a step fails);
# V=1 shows everything as it happens.
INSTALL_LOG ?= $(OUT)/install.log
V ?= 0
ifeq ($(V),1)
step = echo "== $(1)" && $(2)
else
step = printf '%s ... ' "$(1)" && if ( $(2) ) >>$(INSTALL_LOG) 2>&1; then echo ok; else echo "failed (last lines of $(INSTALL_LOG); rerun with V=1 to see it all):"; tail -n 30 $(INSTALL_LOG); exit 1; fi
endif

$(STAMP): pyproject.toml
	@mkdir -p $(dir $(INSTALL_LOG)) && : > $(INSTALL_LOG)
	@$(call step,virtual environment $(VENV),test -x $(PY) || python3 -m venv $(VENV))
	@$(call step,pip,$(PY) -m pip install -q --upgrade pip)
	@$(call step,torch (kept if the venv has one; else $(TORCH_SPEC)),$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)")
	@$(call step,minicpm-edge and its dependencies (llama-cpp-python builds from source once: about 7 minutes),$(PY) -m pip install -e '.[test]')
	@touch $(STAMP)

install: $(STAMP)

# The main job on the bundled model: quantise once, prove quality held, export every target, measure speed.
Q   := $(OUT)/minicpm-tiny-gptq-w4g32
DB  := $(OUT)/bench.sqlite
MINICPM := $(VENV)/bin/minicpm-edge
run: install
	$(MINICPM) quantize --bits 4 --group-size 32 --out $(Q) --force
	$(MINICPM) eval --quant $(Q) --max-drift 0.01 --json $(OUT)/eval.json --plot $(OUT)/eval.png
	for t in ios android harmony onnx; do $(MINICPM) export $(Q) --target $$t --out $(Q)-$$t --force || exit 1; done
	$(MINICPM) eval --quant $(Q)-ios --max-drift 0.01
	$(MINICPM) eval --quant $(Q)-onnx --max-drift 0.01
	$(MINICPM) inspect --verify $(Q)-android
	$(MINICPM) bench run $(Q)-ios --db $(DB) --json $(OUT)/bench-ios.json
	$(MINICPM) bench run $(Q)-onnx --db $(DB)
	$(MINICPM) bench plan --target android --artifact $(Q)-ios --out $(OUT)/bench-kit-android --force
	$(MINICPM) bench plan --target ios --artifact $(Q)-ios --out $(OUT)/bench-kit-ios --force
	$(MINICPM) bench report --db $(DB) --plot $(OUT)/bench.png
	@echo "artifacts in $(OUT)/: GPTQ checkpoint $(Q), exports $(Q)-{ios,android,harmony,onnx}, eval.json/png, bench.png, device kits"

test: install
	$(PY) -m pytest -q

# Re-train the bundled reference model (about 15 minutes on 2 cores).
reference-model: install
	$(PY) -m minicpm_edge.reference

# A MiniCPM-2B-shaped random checkpoint for benchmarks: make synthetic KIND=minicpm-2b
KIND ?= minicpm-2b
synthetic: install
	$(PY) -m minicpm_edge.model.synthetic $(KIND) --out $(OUT)/synthetic-$(KIND)

# Our GPTQ checkpoint through transformers + optimum + gptqmodel 7.6.0 (own venv: it pins numpy 2.2.6).
GQ_VENV ?= .venv-gptqmodel
$(GQ_VENV)/.installed: INSTALL_LOG := $(OUT)/install-gptqmodel.log
$(GQ_VENV)/.installed:
	@mkdir -p $(dir $(INSTALL_LOG)) && : > $(INSTALL_LOG)
	@$(call step,virtual environment $(GQ_VENV),test -x $(GQ_VENV)/bin/python || python3 -m venv $(GQ_VENV))
	@$(call step,torch for gptqmodel ($(TORCH_SPEC)),$(GQ_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)")
	@$(call step,gptqmodel 7.6.0 + optimum,$(GQ_VENV)/bin/python -m pip install -q gptqmodel==7.6.0 optimum sentencepiece)
	@touch $@
interop: install $(GQ_VENV)/.installed
	$(PY) tests/interop/gptqmodel_interop.py export $(OUT)/interop-gptq
	GPTQMODEL_CPU_WORKERS=2 $(GQ_VENV)/bin/python tests/interop/gptqmodel_interop.py check $(OUT)/interop-gptq
	$(PY) tests/interop/gptqmodel_interop.py export-mla $(OUT)/interop-gptq-mla
	GPTQMODEL_CPU_WORKERS=2 $(GQ_VENV)/bin/python tests/interop/gptqmodel_interop.py check $(OUT)/interop-gptq-mla

clean:
	rm -rf $(OUT) .pytest_cache
