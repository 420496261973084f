# Set-up on a fresh machine, the demo and the tests. Everything installs into ./.venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

ML_VENV ?= .venv-monailabel
ML_STAMP := $(ML_VENV)/.installed

# no wheel cache: on a fresh machine it would only hold a second copy of every download
export PIP_NO_CACHE_DIR := 1

.PHONY: venv venv-monailabel tools demo test device-wheels

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

venv: $(STAMP)

# MONAI Label 0.8.5 needs pydicom<3, which highdicom (main environment) cannot share: its own environment.
# It hard-links the main environment's torch (5.3 GB, the same release) instead of a second copy.
$(ML_STAMP): $(STAMP) pyproject.toml apps/medcam/constraints.txt apps/medcam/share_torch.py
	python3 -m venv $(ML_VENV)
	$(ML_VENV)/bin/python -m pip install -q --upgrade pip
	$(PY) apps/medcam/share_torch.py $$($(ML_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
	$(ML_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(ML_VENV)/bin/python -m pip install -q -c apps/medcam/constraints.txt -e '.[nifti,monailabel]'
	touch $(ML_STAMP)

venv-monailabel: $(ML_STAMP)

demo: $(STAMP)
	$(VENV)/bin/medcam demo --output medcam_demo_output

# dciodvfy (Debian's dicom3tools) validates the DICOM SEG files the tests write
tools:
	@command -v dciodvfy >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dicom3tools >/dev/null; }

test: $(STAMP) $(ML_STAMP) tools
	$(PY) -m pytest -q

# what a lent GPU machine lacks to run the benchmarks, into .whl/ (docs/benchmark.md, "On a lent GPU")
device-wheels: $(STAMP)
	$(PY) benchmarks/device_wheels.py
