# Two entry points, both self-contained on a fresh machine with Python 3.11:
#   make demo   generate example data -> fuse experts' masks -> build LMDB databases -> train a small UNet
#               -> predict and evaluate 4 new images (overlays in demo_output/pred/overlays)
#               -> train an instance model (F, C, Db) and segment + match the cells of the 4 new images
#                  (demo_output/pred_instances: labels, measurements, instance_metrics.csv, overlays)
#   make test   run the test suite
# GPU=1 (make demo GPU=1, make test GPU=1) installs requirements-gpu.txt into the same .venv:
# TensorFlow's CUDA libraries, without which TensorFlow on Linux runs on the CPU only.
#   make gpu-check   checks that the pinned GPU set resolves, without installing it (CI runs it)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GPU ?= 0
ifeq ($(GPU),1)
RUNTIME := requirements-gpu.txt
else
RUNTIME := requirements.txt
endif

.PHONY: demo test bench clean gpu-check

$(VENV)/.runtime-gpu$(GPU): requirements.txt $(RUNTIME)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(RUNTIME)
	touch $@

$(VENV)/.dev-gpu$(GPU): requirements.txt requirements-dev.txt $(VENV)/.runtime-gpu$(GPU)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

gpu-check: $(VENV)/.runtime-gpu0
	$(PY) -m pip install --quiet --dry-run --ignore-installed -r requirements-gpu.txt

demo: $(VENV)/.runtime-gpu$(GPU)
	$(PY) data/generate.py --output_folder demo_output/data --n_images 16 --seed 0
	$(PY) build_lmdb.py --image_folder demo_output/data/images --mask_folder demo_output/data/masks \
		--output_folder demo_output/db --dataset_name demo --number_classes 3 --train_fraction 0.75 \
		--tile_size 256 --folds 4 --overwrite --quiet
	$(PY) fuse_masks.py --input_folder demo_output/data/experts --output_folder demo_output/fused --quiet
	$(PY) build_lmdb.py --image_folder demo_output/data/images --mask_folder demo_output/fused \
		--output_folder demo_output/db --dataset_name fused --number_classes 2 --train_fraction 0.75 \
		--tile_size 256 --overwrite --quiet
	rm -rf demo_output/run
	$(PY) train_unet.py --train_database demo_output/db/train-demo.lmdb --test_database demo_output/db/test-demo.lmdb \
		--output_dir demo_output/run --number_classes 3 --model_options '{"base_filters": 16, "depth": 3}' \
		--batch_size 4 --patch_size 128 --learning_rate 1e-3 --test_every_n_steps 50 --max_steps 400 \
		--reader_count 2
	rm -rf demo_output/pred demo_output/new
	$(PY) data/generate.py --output_folder demo_output/new --n_images 4 --seed 1 --n_experts 0
	$(PY) inference.py --model demo_output/run --image_folder demo_output/new/images \
		--mask_folder demo_output/new/masks --output_folder demo_output/pred --probabilities --uncertainty
	# Instance segmentation: one integer per cell, grown by watershed from predicted F, C, Db channels
	$(PY) build_lmdb.py --image_folder demo_output/data/images --mask_folder demo_output/data/instances \
		--output_folder demo_output/db --dataset_name cells --mask_type instance --train_fraction 0.75 \
		--tile_size 256 --overwrite --quiet
	rm -rf demo_output/run_instances demo_output/pred_instances
	$(PY) train_unet.py --train_database demo_output/db/train-cells.lmdb --test_database demo_output/db/test-cells.lmdb \
		--output_dir demo_output/run_instances --target instance --instance_channels F,C,Db \
		--batch_size 4 --test_every_n_steps 100 --max_steps 400 --reader_count 2
	$(PY) inference.py --model demo_output/run_instances --image_folder demo_output/new/images \
		--mask_folder demo_output/new/instances --output_folder demo_output/pred_instances --pixel_size 0.65

test: $(VENV)/.dev-gpu$(GPU)
	$(PY) -m pytest -q tests

bench: $(VENV)/.dev-gpu$(GPU)
	$(PY) benchmarks/bench_build_lmdb.py
	$(PY) benchmarks/bench_reader.py
	$(PY) benchmarks/bench_fusion.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf demo_output .pytest_cache .hypothesis
