# Thin wrapper over CMake carrying the README's commands.
#   make demo        build and run the demo (examples/demo.c) on a simdev
#   make check       build and run every test (plain build)
#   make check-asan  the same tests under ASan+UBSan
#   make check-tsan  the same tests under TSan
#   make check-model spin's check of the fault/invalidation protocol (src/mirror.pml)
#   make bench       build and run every benchmark, printing their BENCH lines
#   make torture     the long torture run, both fault modes (OPS=, SEED=, TORTURE_FLAGS=)
#   make install     install the library and headers (PREFIX=/usr/local)

JOBS   ?= $(shell nproc)
PREFIX ?= /usr/local
CMAKE_FLAGS ?=

BUILD      = build
BUILD_ASAN = build-asan
BUILD_TSAN = build-tsan
BUILD_BENCH = build-bench

# make torture: operations per fault mode, and the seed (default: a new one
# each run, printed first so a failure replays with SEED=).
OPS  ?= 1000000
SEED ?= $(shell date +%s)
TORTURE_FLAGS ?=

.PHONY: all deps demo check check-asan check-tsan check-all check-model bench torture install clean

all: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

deps:
	@./scripts/install-deps.sh

demo: all
	./$(BUILD)/examples/demo

define run_tests
	cmake -S . -B $(1) $(2) $(CMAKE_FLAGS) >/dev/null
	cmake --build $(1) -j $(JOBS)
	cd $(1) && ctest --output-on-failure -j $(JOBS) $(3)
endef

check: deps
	$(call run_tests,$(BUILD),,)

check-asan: deps
	$(call run_tests,$(BUILD_ASAN),-DHMM_SANITIZE=address -DCMAKE_BUILD_TYPE=Debug,)

check-tsan: deps
	$(call run_tests,$(BUILD_TSAN),-DHMM_SANITIZE=thread -DCMAKE_BUILD_TYPE=Debug,-L tsan)

check-all: check check-asan check-tsan

check-model: deps
	./scripts/check-model.sh build-model

bench: deps
	cmake -S . -B $(BUILD_BENCH) -DCMAKE_BUILD_TYPE=Release -DHMM_DEBUG_CHECKS=OFF $(CMAKE_FLAGS) >/dev/null
	cmake --build $(BUILD_BENCH) -j $(JOBS)
	./bench/run-all.sh $(BUILD_BENCH)/bench

torture: all
	./$(BUILD)/tests/torture/torture --ops $(OPS) --seed $(SEED) --mode thread --verbose $(TORTURE_FLAGS)
	./$(BUILD)/tests/torture/torture --ops $(OPS) --seed $(SEED) --mode signal --verbose $(TORTURE_FLAGS)

install: all
	cmake --install $(BUILD) --prefix $(PREFIX)

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) $(BUILD_TSAN) $(BUILD_BENCH) build-model
