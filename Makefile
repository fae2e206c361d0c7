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

# Builds everything and runs every test: the C++ suite, then the Python package's tests.
test: test-cpp test-python

test-cpp: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

test-python:
	bash scripts/python_env.sh
	.venv/bin/python -m pytest tests/python -q

bench: build
	$(BUILD)/fsa_bench --tiles

clean:
	rm -rf $(BUILD)
