# The two commands of the README, plus helpers. Everything builds from a fresh clone; nothing is
# assumed to be installed beyond what scripts/install_system_deps.sh provides.
BUILD ?= build
JOBS ?= 2
# Extra CMake flags, e.g. CMAKE_FLAGS="-DFSA_CUDA_HEAD_DIMS=128 -DFSA_CUDA_DTYPES=bf16" or
# "-DFSA_CUDA_INSTANCES='64_fp16;128_bf16'" (CI uses a reduced CUDA instantiation set this way).
CMAKE_FLAGS ?=

.PHONY: all build demo test test-cpp test-python bench deps clean

all: build

deps:
	bash scripts/install_system_deps.sh

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DFSA_WARNINGS_AS_ERRORS=ON $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

# Builds the library and runs the demo on the default backend (the CPU when there is no GPU).
demo: build
	$(BUILD)/fsa_demo

# Builds everything and runs every test: the C++ suite, then the Python package's tests. The
# Python dependencies (a download of a few GB on a fresh clone) install in the background while the
# C++ side builds and runs; their log is $(BUILD)/python-deps.log.
test:
	@mkdir -p $(BUILD)
	@echo "python dependencies: installing in the background (log: $(BUILD)/python-deps.log)"
	@bash scripts/python_env.sh --deps-only > $(BUILD)/python-deps.log 2>&1 & deps=$$!; \
	  $(MAKE) --no-print-directory test-cpp; cpp=$$?; \
	  wait $$deps; py=$$?; \
	  if [ $$py -ne 0 ]; then cat $(BUILD)/python-deps.log; exit $$py; fi; \
	  if [ $$cpp -ne 0 ]; then exit $$cpp; fi; \
	  $(MAKE) --no-print-directory test-python

test-cpp: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

test-python:
	bash scripts/python_env.sh
	.venv/bin/python -m pytest tests/python -q

bench: build
	$(BUILD)/fsa_bench --tiles

clean:
	rm -rf $(BUILD)
