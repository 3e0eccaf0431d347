# Each target creates .venv and installs the pinned requirements on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 2
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=
# Test files are spread over this many processes (pytest-xdist; a file's tests stay in one process).
TEST_WORKERS ?= 2

.PHONY: demo two-hop pareto latentwire latentwire-two latentwire-compressed latentwire-seeds qkvcomm-scheme projection-ridge c2c facts layer-sweep docs-tables test test-fast test-float test-slurm lint format test-gpu bench bench-gpu gpu-check gpu-kit legacy-transformers install clean-venv

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt requirements-deepspeed.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -r requirements-deepspeed.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m cross_model.models
	touch $(STAMP)

install: $(STAMP)

# Each of these writes the results file its README/docs tables are rendered from, then rewrites them.
demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) run_experiments.py --config $(CONFIG)
	@if [ "$(CONFIG)" = "configs/quickstart.yaml" ]; then \
		$(PY) -m cross_model.doc_tables --publish runs/quickstart docs/quickstart --pair ac_gemma_trained:ac_gemma_sliced \
		&& $(PY) -m cross_model.doc_tables --write; fi

# Multi-sender methods on real models offline: the two-hop task (configs/two_hop.yaml).
two-hop: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) run_experiments.py --config configs/two_hop.yaml
	$(PY) -m cross_model.doc_tables --publish runs/two_hop docs/two_hop --pair kvcomm_all:kvcomm_all_public
	$(PY) -m cross_model.doc_tables --write

pareto: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) run_experiments.py --config configs/qkvcomm_pareto.yaml
	$(PY) -m cross_model.doc_tables --publish runs/qkvcomm_pareto docs/qkvcomm --reference kvcomm_30 \
		--pair qkvcomm_3bit:qkvcomm_3bit_plain --pair qkvcomm_2bit:qkvcomm_3bit_plain
	$(PY) -m cross_model.agreement runs/qkvcomm_pareto kvcomm_30 > docs/qkvcomm/agreement_with_kvcomm_30.md
	$(PY) -m cross_model.doc_tables --write

# LatentWire's learning runs (train, evaluate, report with the controls), published to docs/. One
# process by default: on the 2-core machine one process with 2 threads trained 0.77 steps/s, two
# ranks with 1 thread each 0.5 (LW_NPROC=2 runs the same job under DDP).
LW_NPROC ?= 1
latentwire: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(LW_NPROC) run_experiments.py --config configs/latentwire_ladder.yaml
	$(PY) -m cross_model.doc_tables --publish runs/latentwire_ladder docs/latentwire
	$(PY) -m cross_model.doc_tables --write

latentwire-two: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(LW_NPROC) run_experiments.py --config configs/latentwire_two_receivers.yaml
	$(PY) -m cross_model.doc_tables --publish runs/latentwire_two_receivers docs/latentwire_two
	$(PY) -m cross_model.doc_tables --write

latentwire-compressed: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(LW_NPROC) run_experiments.py --config configs/latentwire_compressed.yaml
	$(PY) -m cross_model.doc_tables --publish runs/latentwire_compressed docs/latentwire_compressed
	$(PY) -m cross_model.doc_tables --write

# The ladder with LW_SEEDS interlingua seeds (the same test items, another initialisation and training
# order each): the mean and spread over seeds (docs/latentwire_seeds/seeds.json).
LW_SEEDS ?= 0 1 2
latentwire-seeds: $(STAMP)
	for s in $(LW_SEEDS); do $(VENV)/bin/torchrun --standalone --nproc_per_node=$(LW_NPROC) run_experiments.py \
		--config configs/latentwire_ladder.yaml --name latentwire_ladder_seed$$s --interlingua.seed $$s || exit 1; done
	$(PY) -m cross_model.seed_spread docs/latentwire_seeds $(foreach s,$(LW_SEEDS),runs/latentwire_ladder_seed$(s))
	$(PY) -m cross_model.doc_tables --write

qkvcomm-scheme: $(STAMP)
	$(PY) -m bench.choose_qkvcomm_scheme --json docs/qkvcomm/scheme_choice.json

facts: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) run_experiments.py --config configs/qkvcomm_facts.yaml
	$(PY) -m cross_model.doc_tables --publish runs/qkvcomm_facts docs/facts --reference kvcomm_30
	$(PY) -m cross_model.doc_tables --write

layer-sweep: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) run_experiments.py --config configs/ac_layer_sweep.yaml
	$(PY) -m cross_model.doc_tables --publish runs/ac_layer_sweep docs/layer_sweep --pair ac_layers_k20_j20:ac_random_k20
	$(PY) -m cross_model.doc_tables --write

c2c: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) run_experiments.py --config configs/c2c_quickstart.yaml
	$(PY) -m cross_model.doc_tables --publish runs/c2c_quickstart docs/c2c --pair c2c:c2c_other_item --pair c2c:c2c_shuffled_a --pair c2c:skyline --pair kv_translate:kv_translate_other_item --pair kv_translate:kv_translate_shuffled_a
	$(PY) -m cross_model.doc_tables --write

projection-ridge: $(STAMP)
	$(PY) -m bench.choose_projection_ridge --json docs/projection/ridge_choice.json

docs-tables: $(STAMP)
	$(PY) -m cross_model.doc_tables --write

# The suite, nothing installed outside .venv and the caches (the real-SLURM tests skip: see test-slurm).
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The float-sensitive tests (marker float_sensitive) again under other CPU kernels and thread counts, so
# a tolerance that holds only for this CPU's kernels or for one thread count fails here, not on the next
# machine: AVX2 kernels (whatever this CPU has beyond them) and 1 or 2 intra-op threads (`make test`
# itself runs them with this CPU's best kernels and 2 threads).
FLOAT_MATRIX ?= default:1 avx2:1 avx2:2
test-float: $(STAMP)
	@for cell in $(FLOAT_MATRIX); do cap=$${cell%%:*}; threads=$${cell##*:}; \
		echo "float-sensitive tests: ATEN_CPU_CAPABILITY=$$cap, $$threads thread(s)"; \
		if [ "$$cap" = default ]; then unset ATEN_CPU_CAPABILITY; else export ATEN_CPU_CAPABILITY=$$cap; fi; \
		OMP_NUM_THREADS=$$threads $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m float_sensitive \
			$(PYTEST_ARGS) || exit 1; done
	@echo "the GPU tests' bf16 tolerances, in bf16 on this CPU"
	CROSS_MODEL_GPU_TESTS_DEVICE=cpu $(PY) -m pytest -q tests/test_gpu.py $(PYTEST_ARGS)

# The real one-node SLURM tests (marker slurm). As root this INSTALLS slurm-wlm and munge system-wide
# (apt-get) and writes /etc/munge/munge.key (slurm/local_cluster.sh); elsewhere they skip.
test-slurm: $(STAMP)
	CROSS_MODEL_SLURM_TESTS=1 $(PY) -m pytest -q -m slurm $(PYTEST_ARGS)

# Style kept by tools: ruff's rules and formatter (pyproject.toml: line length 100, pyflakes, imports).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# The packaged models' cache directories read in transformers 4.53 (the public KVComm code's pin),
# installed beside ours with pip --target (needs the package index), against ours.
LEGACY_TF ?= /tmp/transformers-4.53
legacy-transformers: $(STAMP)
	$(PY) -m pip install -q --target $(LEGACY_TF) "transformers==4.53.3" "tokenizers>=0.21,<0.22" "huggingface_hub>=0.30,<1.0" --no-deps
	$(PY) -m bench.legacy_transformers --legacy-path $(LEGACY_TF) --json docs/legacy_transformers.json

bench: $(STAMP)
	$(PY) -m bench.run --json docs/bench_cpu.json
	$(PY) -m cross_model.doc_tables --write

# The GPU machines are bare (no package index): these two use the machine's own python, torch and
# transformers and install nothing (GPU_PY=.venv/bin/python where the venv is the one with CUDA).
GPU_PY ?= python3
test-gpu:
	PYTHONPATH=. $(GPU_PY) -m bench.gpu_tests --json docs/test_gpu.json

bench-gpu:
	PYTHONPATH=. $(GPU_PY) -m bench.gpu --json docs/bench_gpu.json

# Every GPU check in one call on a bare GPU machine, under 8 minutes, one deadline and one JSON per step
# under $OUT (else docs/gpu_check): the GPU tests, the bench's short and long workloads at batches 1
# and 8, NLD and CIPHER at batch 8, one kvcomm_llama8b evaluator batch at its real shapes with its peak
# memory against the dry run's estimate (bench/gpu_check.py). Carry .gpukit (make gpu-kit) with it.
gpu-check:
	PYTHONPATH=. $(GPU_PY) -m bench.gpu_check

# Here, once: what a bare GPU machine lacks for gpu-check, in .gpukit/ (ignored; carry it): SmolLM2's
# tokenizer, so the bench's prompts have the public code's lengths and its ratio to them prints. The
# machine's own torch and transformers run (pyproject.toml admits transformers >= 5.17).
gpu-kit: $(STAMP)
	rm -rf .gpukit && mkdir -p .gpukit
	$(PY) -c "from bench.gpu import bench_tokenizer; bench_tokenizer()[0].save_pretrained('.gpukit/tok')"
	@du -sm .gpukit | awk '{ if ($$1 > 64) { print "gpu-kit: " $$1 " MiB, over the 64 MiB a call carries"; exit 1 } else print "gpu-kit: " $$1 " MiB in .gpukit" }'

clean-venv:
	rm -rf $(VENV)
