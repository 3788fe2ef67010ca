# Two commands set up and run everything on a fresh machine (see README.md):
#   make demo   installs, then pretrains a tiny BERT (pretrain_bert.py with no data flags) on
#               2 CPU processes with tensor parallelism 2
#   make test   installs, then runs the whole test suite
PYTHON ?= python3
NPROC ?= 2

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[test]"

demo: install
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) \
		pretrain_bert.py --tensor-model-parallel-size $(NPROC)

test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) bench/bench_mpu.py
	$(PYTHON) bench/bench_model.py
	$(PYTHON) bench/bench_preprocess.py
	$(PYTHON) bench/bench_train.py
	$(PYTHON) bench/bench_checkpoint.py
	$(PYTHON) bench/bench_finetune.py
