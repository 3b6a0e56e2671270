# The README's commands. `make demo` and `make test` create the virtual environment themselves.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= lit

.PHONY: demo test test-fast bench install sysdeps clean

install: $(STAMP)

# Re-installs when the dependency pins change. The torch trio is pinned in constraints.txt (torchaudio exists only
# for matching torch releases). pip holds every wheel it downloaded until its whole step is installed, and torch and
# its CUDA libraries are most of the ~8 GB venv, so they come in steps of their own: torch alone, then its
# libraries with torchvision and torchaudio, then the rest. Peak disk use 12.0 -> 9.7 GB (measured). No pip cache:
# it would keep a second copy of those wheels.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt --no-deps torch
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt torch torchvision torchaudio
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt -e ".[demo,test,coco]"
	touch $(STAMP)

# Debian packages, installed only when missing: espeak-ng (the demos synthesise speech with it), chromium
# (a test renders the HTML run report headless), a Java runtime (coco-caption's PTB tokenizer and METEOR, shipped
# by pycocoevalcap), emoji glyphs and names (the CWCL demo's images and captions).
SYSDEPS := espeak-ng chromium
sysdeps:
	@missing=""; for p in $(SYSDEPS); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	command -v java >/dev/null || missing="$$missing default-jre-headless"; \
	if [ -n "$$missing" ]; then apt-get update -q && apt-get install -y -q $$missing; fi
	test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf -a -f /usr/share/unicode/emoji/emoji-test.txt || \
		(apt-get update -q && apt-get install -y -q fonts-noto-color-emoji unicode-data)

demo: $(STAMP) sysdeps
	$(VENV)/bin/mmalign demo $(DEMO)

# Every test, as CI runs it (.ci/run), after the import layers (pyproject.toml, tool.importlinter).
test: $(STAMP) sysdeps
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# The unit tier while developing: no end-to-end runs (slow) and no torchrun (distributed); under 2 minutes.
test-fast: $(STAMP) sysdeps
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not slow and not distributed"

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf runs .pytest_cache
