# Two entry points, both self-installing on a fresh machine:
#   make demo   — create .venv, install, explain a shipped sample model on a shipped image
#   make test   — create .venv, install with the test and ray extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= attnexplain-out

.PHONY: install demo lint test test-heavy samples clean

PLUGINS := plugins/attention-cnn plugins/timm plugins/transformers plugins/openclip

# The demo needs the package and the attention-CNN plugin its third and fourth models use; the test extras
# (reference implementations, scikit-image, Playwright), the Ray extra and the timm, transformers
# and OpenCLIP plugins are for `make test`.
$(BIN)/.installed-demo: pyproject.toml constraints.txt plugins/attention-cnn/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e . -e plugins/attention-cnn
	touch $@

# Quantus 0.6.0 (the localisation and randomization reference of tests/test_metrics.py) goes in
# with --no-deps: it declares opencv-python, whose cv2 would overwrite opencv-python-headless's.
# The modules it imports come with attnexplain's dependencies and its test extra.
$(BIN)/.installed: $(BIN)/.installed-demo $(addsuffix /pyproject.toml,$(PLUGINS))
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,ray]' $(addprefix -e ,$(PLUGINS))
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt quantus==0.6.0
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed-demo
	$(BIN)/attnexplain run samples/models/resnet-composites.pt samples/images/cat-on-grass.png --out $(OUT)
	$(BIN)/attnexplain run samples/models/vit-composites.pt samples/images/rocket-on-brick.png --out $(OUT)
	$(BIN)/attnexplain run samples/models/attention-cnn-composites.pt samples/images/coffee-on-gravel.png --out $(OUT)
	$(BIN)/attnexplain run samples/models/cbam-composites.pt samples/images/astronaut-on-grass.png --out $(OUT)
	@echo
	@echo "Outputs are in $(OUT)/ — open $(OUT)/cat-on-grass/report.html (ResNet, Grad-CAM),"
	@echo "$(OUT)/rocket-on-brick/report.html (ViT, attention rollout) and"
	@echo "$(OUT)/coffee-on-gravel/report.html (attention CNN: its learned attention beside Grad-CAM) and"
	@echo "$(OUT)/astronaut-on-grass/report.html (CBAM CNN: its spatial attention, cbam_spatial, beside Grad-CAM)"

# One style (ruff's lint and format check, configured in pyproject.toml) and the public API's types
# (mypy, the files listed in pyproject.toml): the first step of `make test`, so CI runs them.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

test-heavy: install
	$(BIN)/python -m pytest -q -m heavy

samples: install
	$(BIN)/python samples/train.py --out samples/models

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
