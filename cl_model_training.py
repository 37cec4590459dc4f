"""Fine-tune a backbone contrastively (CL) for one hemisphere and ROI: per subject, or pooled over subjects.

The backbone's final embedding (AlexNet: its 1000 outputs) and the ROI's fMRI are projected to h dimensions
(h = 0.8 V per subject; pooled: 5741 or the subjects' mean V), passed through one shared MLP head to z = h / 4, and
trained so each image's embedding is closest (cosine, temperature t) to its own fMRI (Mulrooney & Brockmeier).
One subject in `subjects` trains that subject's model; several (or all) train one model pooled over them: a shared
backbone and head, one fMRI projection per subject, batches of one subject at a time. Trains on the train split,
keeps the epoch with the lowest val loss (best.pt); one model per seed, in out_dir/models/<backbone>/cl/subjXX/
<hemi>/<roi>/seed<K>/ (pooled: models/<backbone>/pooled-cl-{hconst,havg}/<hemi>/<roi>/[loso-subjXX/]seed<K>/).
Runs unchanged under `torchrun --nproc_per_node=N cl_model_training.py ...` (DDP; batch_size is the global batch).
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                # everything derived goes here (splits, image caches, models)
subjects = [1]                 # one subject: its own model; several, or all: one model pooled over them
exclude_subject = 0            # pooled: leave this subject out (leave-one-subject-out model; 0 = none)
hemisphere = "lh"              # lh | rh
roi = "FFA-1"                  # one of the 31 challenge ROIs
seeds = [0]                    # one model per seed (model init, batch order, dropout), each in its own folder
epochs = 30                    # training epochs (paper: 30)
batch_size = 1024              # global batch size, split over ranks under torchrun (paper: 1024)
lr = 1e-4                      # Adam learning rate (paper: 1e-4)
temperature = 0.3              # contrastive temperature t (paper: 0.3)
symmetric_loss = False         # also average the fMRI->image direction (CLIP style); paper: image direction only
lr_schedule = "plateau"        # plateau: ReduceLROnPlateau on the val loss (this repo) | none: constant lr (original)
lr_patience = 3                # plateau: epochs without val-loss improvement before the lr drops
lr_factor = 0.1                # plateau: lr multiplier
pooled_h_method = "constant"   # pooled: hidden size h = 5741 (constant, the original's) | average (mean voxel count)
subject_order = "interleaved"  # pooled: interleaved (subjects' batches in seeded random order) | sequential
backbone = "alexnet"           # alexnet (the paper's) | a torchvision classifier (resnet50, vit_b_16, convnext_tiny,
                               # ...) | timm:<name> | open_clip:<arch>/<tag> | tiny, tiny-vit (test stand-ins)
weights = "DEFAULT"            # DEFAULT (the weights' own; torchvision, timm or open_clip cache) | a torchvision
                               # weights name (IMAGENET1K_V1) | none (random init) | a local state dict
dropout = 0.5                  # p of the backbone's dropout layers that are on (AlexNet's classifier: torchvision's
                               # 0.5; ViTs' p=0 layers stay off); 0 makes DDP runs match 1 process
image_size = 224               # input size in px (PNGs decoded once into the image cache at this size; ViTs and
                               # CLIP take only their own size: 224, tiny-vit 32)
hflip = False                  # random horizontal flips (off: a flip swaps the visual hemifields)
min_voxels = 20                # train an ROI (pool a subject) with at least this many voxels (original pooled: 1)
batching = "even"              # even: near-equal global batches (this repo) | remainder: batch_size + a smaller last
fit_split = "train"            # train | train+val (the original's 85 %; needs lr_schedule=none, keep_last=true)
checkpoint_dtype = "float32"   # float32 | bfloat16: weights of the kept best.pt (bfloat16 halves the disk)
keep_last = False              # keep last.pt once finished (to extend the run later); else best.pt alone stays
resume = False                 # continue an interrupted run from last.pt (exact)
stop_after_epoch = 0           # stop after this epoch without finishing (0 = train all epochs)
device = "auto"                # auto (cuda if present) | cpu | cuda | cuda:1
amp = True                     # bfloat16 autocast on GPU
cpu_bf16 = True                # bfloat16 autocast on CPU where it has bf16 instructions (~1.6x faster there)
channels_last = True           # channels-last memory format for the conv layers (measured faster on CPU)
loader_workers = 0             # DataLoader worker processes; 0: one reader thread in this process (measured faster)
num_threads = 0                # torch CPU threads (0 = torch default)
split_seed = 0                 # train/val/test split seed (shared by every stage)
check_values = True            # scan the fMRI for NaN/inf first
# ---------------------------------------------------------------------
import options

config = options.apply_options(globals())

from dataclasses import replace  # noqa: E402

import outputs  # noqa: E402
import paths  # noqa: E402
import training  # noqa: E402
import training_data  # noqa: E402
import utils  # noqa: E402
from runtime import setup_runtime  # noqa: E402

# runtime: the device, and torch.distributed when launched by torchrun
runtime = setup_runtime(device, num_threads)
subject_list, pooled = training_data.training_subjects(data_dir, subjects, exclude_subject)
settings = training.TrainSettings.from_options(config, pooled)
seed_list = training.check_seeds(seeds)

# data: each subject's split, image cache and this ROI's fMRI (rank 0 builds the caches first); an excluded
# subject's files are never opened
(roi,) = utils.check_roi_names([roi])
subjects_data = [utils.load_subject(data_dir, s, out_dir, image_size, split_seed, [hemisphere], check_values,
                                    build_first=runtime.main_first) for s in subject_list]
sources, too_small = training_data.trainable_sources(subjects_data, hemisphere, roi, min_voxels)
if not sources:
    raise options.DataError(f"{hemisphere} {roi}: " + ", ".join(f"subject {s} has {n} voxels" for s, n in
                                                             too_small.items())
                            + f"; training needs at least {min_voxels}")
if runtime.is_main:
    print(f"{'pooled ' if pooled else ''}cl {hemisphere} {roi}: " + ", ".join(
        f"subject {s.subject} ({len(s.voxel_indices)} voxels, {len(s.split['train'])} train / "
        f"{len(s.split['val'])} val)" for s in sources) + (f"; left out for < {min_voxels} "
                                                           f"voxels: {too_small}" if too_small else "")
          + f"; seeds {seed_list}; {runtime.world_size} x {runtime.device}")

# the loop over seeds, each a whole training run: training.train_roi_model (restore or init, epochs, save)
rows = []
for seed in seed_list:
    run_dir = paths.model_dir(out_dir, "cl", hemisphere, roi, subject=None if pooled else subject_list[0], seed=seed,
                              backbone=settings.backbone, exclude_subject=exclude_subject or None,
                              pooled_h_method=pooled_h_method)
    summary = training.train_roi_model("cl", sources, run_dir, replace(settings, seed=seed), config, runtime,
                                       desc=f"{'pooled ' if pooled else ''}cl {hemisphere} {roi} seed {seed}")
    rows.append({"hemisphere": hemisphere, "roi": roi, "seed": seed, **summary, "run_dir": str(run_dir)})

# report
if runtime.is_main:
    print(outputs.format_table(rows, float_format="{:.4g}"))
runtime.close()
