# Thin wrapper over CMake carrying the README's commands.
#   make demo        build and run the demo (examples/demo.c) on a simdev
#   make check       build and run every test (plain build)
#   make check-asan  the same tests under ASan+UBSan
#   make check-tsan  the same tests under TSan
#   make check-fuzz  build the libFuzzer harness (clang) and fuzz for FUZZ_SECONDS
#   make check-model spin's check of the fault/invalidation protocol (src/mirror.pml)
#   make bench       build and run every benchmark, printing their BENCH lines
#   make torture     the long torture run, both fault modes (OPS=, SEED=, TORTURE_FLAGS=)
#   make install     install the library and headers (PREFIX=/usr/local)

JOBS   ?= $(shell nproc)
PREFIX ?= /usr/local
CMAKE_FLAGS ?=
FUZZ_SECONDS ?= 60

BUILD      = build
BUILD_ASAN = build-asan
BUILD_TSAN = build-tsan
BUILD_BENCH = build-bench
BUILD_FUZZ = build-fuzz

# make torture: operations per fault mode, and the seed (default: a new one
# each run, printed first so a failure replays with SEED=).
OPS  ?= 1000000
SEED ?= $(shell date +%s)
TORTURE_FLAGS ?=

.PHONY: all deps test-env demo check check-asan check-tsan check-fuzz check-model check-all bench torture \
	install clean

all: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

deps:
	@./scripts/install-deps.sh

# What the tests want of the machine (a few huge pages), best effort.
test-env:
	@./scripts/test-env.sh

demo: all
	./$(BUILD)/examples/demo

define run_tests
	cmake -S . -B $(1) $(2) $(CMAKE_FLAGS) >/dev/null
	cmake --build $(1) -j $(JOBS)
	cd $(1) && ctest --output-on-failure -j $(JOBS) $(3)
endef

check: deps test-env
	$(call run_tests,$(BUILD),,)

check-asan: deps test-env
	$(call run_tests,$(BUILD_ASAN),-DHMM_SANITIZE=address -DCMAKE_BUILD_TYPE=Debug,)

check-tsan: deps test-env
	$(call run_tests,$(BUILD_TSAN),-DHMM_SANITIZE=thread -DCMAKE_BUILD_TYPE=Debug,-L tsan)

# tests/fuzz/fuzz_api for FUZZ_SECONDS (0: until stopped), starting from the
# seeds and every regression input; new inputs go to $(BUILD_FUZZ)/corpus, a
# crashing one to $(BUILD_FUZZ)/artifacts/, and any crash, leak or timeout
# fails the target.
check-fuzz: deps
	cmake -S . -B $(BUILD_FUZZ) -DCMAKE_C_COMPILER=clang -DHMM_FUZZ=ON $(CMAKE_FLAGS) >/dev/null
	cmake --build $(BUILD_FUZZ) -j $(JOBS) --target fuzz_api
	mkdir -p $(BUILD_FUZZ)/corpus $(BUILD_FUZZ)/artifacts
	./$(BUILD_FUZZ)/tests/fuzz/fuzz_api -max_total_time=$(FUZZ_SECONDS) -timeout=30 \
		-print_final_stats=1 -artifact_prefix=$(BUILD_FUZZ)/artifacts/ \
		$(BUILD_FUZZ)/corpus tests/fuzz/corpus tests/fuzz/regressions

check-all: check check-asan check-tsan check-fuzz

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
	rm -rf $(BUILD) $(BUILD_ASAN) $(BUILD_TSAN) $(BUILD_BENCH) $(BUILD_FUZZ) build-model
