# Two commands on a fresh machine: `make demo` and `make test` (see README).
# ComfyUI comes from COMFYUI_PATH or is cloned from COMFYUI_REPO at COMFYUI_REF into
# $${XDG_CACHE_HOME:-~/.cache}/comfyui-optim/; the virtual environment lives there too (OPTIM_VENV).
PYTHON ?= python3
VENV_PY := $(shell $(PYTHON) tools/setup_env.py --print-python)
PYTEST_ARGS ?=

.PHONY: setup test demo bench-noop report

setup:
	$(PYTHON) tools/setup_env.py

test:
	$(PYTHON) tools/setup_env.py --comfyui-optional
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV_PY) -m demo

bench-noop: setup
	$(VENV_PY) -m bench run noop --model sd15
	$(VENV_PY) -m bench run noop --model flux

report: setup
	$(VENV_PY) -m bench report --readme README.md
