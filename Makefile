# `make demo`: set up .venv, generate the synthetic demo dataset, run every pipeline stage on it.
# `make test`: set up .venv (with the optional backbones' packages) and run the test suite.
PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-requirements
EXTRAS_STAMP := $(VENV)/.installed-extras
DEMO_DATA  ?= demo_data
DEMO_OUT   ?= demo_out
RESULTS    ?= Results
# The demo runs offline on CPU: random-init AlexNet, 64 px images, 2 ROIs of lh (FFA-1 with 2 seeds), 3 epochs;
# every stage runs in order: mappings, training (per subject, pooled, leave-one-subject-out), layer search, results
# (tables, figures, cortical maps), submission. Stage times: README.
DEMO_FLAGS := --data_dir=$(DEMO_DATA) --out_dir=$(DEMO_OUT) --weights=none --image_size=64
DEMO_ROIS  ?= V1v,FFA-1
DEMO_SEED_ROI ?= FFA-1
DEMO_POOLED_ROI ?= FFA-1
DEMO_TRAIN ?= --epochs=3 --batch_size=128
DEMO_SWEEP := $(DEMO_FLAGS) $(DEMO_TRAIN) --hemispheres=lh
DEMO_POOLED := $(DEMO_FLAGS) $(DEMO_TRAIN) --hemisphere=lh --roi=$(DEMO_POOLED_ROI) --subjects=all
SUBMISSION ?= $(RESULTS)/submission

.PHONY: setup test demo demo-data clean-demo bench

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# the tests also cover the optional timm and open_clip backbones (random init, offline)
$(EXTRAS_STAMP): $(STAMP) requirements-extras.txt
	$(PY) -m pip install -q -r requirements-extras.txt
	touch $(EXTRAS_STAMP)

test: setup $(EXTRAS_STAMP)
	$(PY) -m pytest -q --durations=10 tests

demo-data: setup
	$(PY) make_demo_data.py --out_dir=$(DEMO_DATA) --imagefolder_per_class=20

demo: demo-data
	$(PY) generate_voxel_roi_mappings.py --data_dir=$(DEMO_DATA) --out_dir=$(DEMO_OUT)
	for s in 1 2; do for m in cl reg; do \
	  $(PY) $${m}_model_training_all_rois.py $(DEMO_SWEEP) --subjects=$$s --rois=$(DEMO_ROIS) && \
	  $(PY) $${m}_model_training_all_rois.py $(DEMO_SWEEP) --subjects=$$s --rois=$(DEMO_SEED_ROI) --seeds=0,1 \
	  || exit 1; done; done
	$(PY) cl_model_training.py $(DEMO_POOLED) --pooled_h_method=average
	$(PY) reg_model_training.py $(DEMO_POOLED)
	for s in 1 2; do \
	  $(PY) cl_model_training.py $(DEMO_POOLED) --pooled_h_method=average --exclude_subject=$$s || exit 1; \
	done
	$(PY) get_best_alex_layer.py $(DEMO_FLAGS) --pooled_h_method=average
	$(PY) generate_results.py $(DEMO_FLAGS) --results_dir=$(RESULTS) --result_type=all --hemispheres=lh \
	  --cross_subj_rois=$(DEMO_ROIS) --classification_rois=$(DEMO_POOLED_ROI) --pooled_h_method=average \
	  --classification_root=$(DEMO_DATA)/imagefolder
	$(PY) predict_test_images.py $(DEMO_FLAGS) --submission_dir=$(SUBMISSION) --pooled_h_method=average
	@echo "demo finished: tables, figures and cortical maps in $(RESULTS)/, a challenge submission in" \
	  "$(SUBMISSION)/, models in $(DEMO_OUT)/models/"

bench: setup
	$(PY) benchmark.py

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_OUT) $(SUBMISSION)

# `make demo-backbone` (BACKBONE=resnet18 by default; any backbones.parse name, e.g. convnext_tiny, timm:resnet18,
# or tiny-vit with BACKBONE_SIZE=32): the whole comparison, untuned vs reg- vs CL-tuned, with another backbone on the
# demo data, random init offline: layer search, CL and reg models per subject, the tuned searches, results, submission.
BACKBONE      ?= resnet18
BACKBONE_SIZE ?= 64
BACKBONE_FLAGS := --data_dir=$(DEMO_DATA) --out_dir=$(DEMO_OUT) --weights=none --image_size=$(BACKBONE_SIZE) \
                  --backbone=$(BACKBONE)
BACKBONE_RESULTS ?= $(RESULTS)/$(subst :,-,$(subst /,_,$(BACKBONE)))
.PHONY: demo-backbone
demo-backbone: demo-data
	$(PY) generate_voxel_roi_mappings.py --data_dir=$(DEMO_DATA) --out_dir=$(DEMO_OUT)
	$(PY) get_best_alex_layer.py $(BACKBONE_FLAGS) --hemispheres=lh --feature_sets=untuned
	for s in 1 2; do \
	  $(PY) cl_model_training_all_rois.py $(BACKBONE_FLAGS) $(DEMO_TRAIN) --hemispheres=lh --rois=$(DEMO_ROIS) --subjects=$$s && \
	  $(PY) reg_model_training_all_rois.py $(BACKBONE_FLAGS) $(DEMO_TRAIN) --hemispheres=lh --rois=$(DEMO_ROIS) --subjects=$$s \
	  || exit 1; \
	done
	$(PY) get_best_alex_layer.py $(BACKBONE_FLAGS) --hemispheres=lh --rois=$(DEMO_ROIS)
	$(PY) generate_results.py $(BACKBONE_FLAGS) --results_dir=$(BACKBONE_RESULTS) --result_type=all --hemispheres=lh \
	  --rois=$(DEMO_ROIS) --cross_subj_rois=$(DEMO_ROIS) --classification_rois=$(DEMO_POOLED_ROI) \
	  --classification_root=$(DEMO_DATA)/imagefolder --feature_sets=untuned,reg,cl --comparisons=cl:untuned,cl:reg
	$(PY) predict_test_images.py $(BACKBONE_FLAGS) --submission_dir=$(BACKBONE_RESULTS)/submission --tuned_sets=cl,reg
	@echo "demo-backbone finished: $(BACKBONE) tables and figures in $(BACKBONE_RESULTS)/, models in $(DEMO_OUT)/models/"
