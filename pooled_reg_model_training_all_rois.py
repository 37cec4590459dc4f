"""Fine-tune a pooled regression (reg) AlexNet for every ROI, pooling the subjects that have the ROI.

Loads every subject's split, memory-mapped image cache and fMRI once for all ROIs; each ROI pools the subjects
whose ROI has >= 20 voxels (an ROI no subject has is listed as skipped). ROIs already finished (done.json) are
skipped and a half-trained ROI resumes from its last.pt. --exclude_subject=s trains the leave-one-subject-out
models without s (s's files are never opened). --shard=i/n takes every n-th (hemisphere, ROI) job from job i,
so n processes or a Slurm array split a sweep without coordination. Ends with a table of ROI, subjects, voxels,
best val metric and minutes, saved as out_dir/models/pooled-reg/summary[_loso-subjXX][_shard-i-of-n].csv.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                # everything derived goes here (splits, image caches, models)
subjects = []                  # subjects to pool; [] = every subject in data_dir
exclude_subject = 0            # leave-one-subject-out: train without this subject (0 = none)
hemispheres = ["lh", "rh"]     # hemispheres to sweep
rois = []                      # ROIs to sweep; [] = all 31
shard = "0/1"                  # i/n: this process trains jobs i, i+n, i+2n, ... of the sweep
resume = True                  # skip finished ROIs and resume half-trained ones (false: retrain everything)
subject_order = "interleaved"  # "interleaved": subjects' batches in seeded random order; "sequential": one by one
epochs = 75                    # training epochs (as the per-subject reg models: 75)
batch_size = 1024              # global batch size
lr = 2.5e-5                    # Adam learning rate (as the per-subject reg models: 2.5e-5)
lr_schedule = "plateau"        # "plateau": ReduceLROnPlateau on the mean val loss; "none": constant lr
lr_patience = 3                # plateau: epochs without val-loss improvement before the lr drops
lr_factor = 0.1                # plateau: lr multiplier
backbone = "alexnet"           # "alexnet" (the paper's); "tiny" is a small stand-in network for fast tests
weights = "IMAGENET1K_V1"      # "IMAGENET1K_V1" (torchvision cache), "none" (random init) or a local .pth state dict
dropout = 0.5                  # AlexNet classifier dropout (torchvision default; 0 makes DDP runs match 1 process)
image_size = 224               # input size in px
hflip = False                  # random horizontal flips (off: a flip swaps the visual hemifields)
device = "auto"                # "auto" (cuda if present), "cpu", "cuda", "cuda:1"
amp = True                     # bfloat16 autocast on GPU
cpu_bf16 = True                # bfloat16 autocast on CPU where it has bf16 instructions (~1.6x faster there)
channels_last = True           # channels-last memory format for the conv layers (measured faster on CPU)
loader_workers = 0             # DataLoader worker processes; 0: one reader thread in this process (measured faster)
num_threads = 0                # torch CPU threads (0 = torch default)
seed = 0                       # model init, batch order, dropout
split_seed = 0                 # train/val/test split seed (shared by every stage)
stop_after_epoch = 0           # stop each ROI after this epoch without finishing (0 = train all epochs)
slim_finished = True           # drop optimizer state from last.pt once done
check_values = True            # scan the fMRI for NaN/inf first
# ---------------------------------------------------------------------
import models
import options
import outputs
import training
import training_data
import utils
from runtime import setup_runtime

config = options.apply_options(globals())

# runtime: the device, and torch.distributed when launched by torchrun
runtime = setup_runtime(device, num_threads)
settings = training.TrainSettings.from_options(config)
shard_index = training.parse_shard(shard)
jobs = training.sweep_jobs(hemispheres, rois, shard_index)

# data: every pooled subject's split, image cache and fMRI (memory-mapped), loaded once for every ROI
candidates = training_data.pooled_candidates(data_dir, subjects, exclude_subject)
subjects_data = [utils.load_subject(data_dir, s, out_dir, image_size, split_seed, sorted({h for h, _ in jobs}),
                                    check_values, build_first=runtime.main_first) for s in candidates]

# the loop over (hemisphere, ROI) jobs: finished ones skipped, half-trained ones resumed, ROIs no subject has listed
rows = []
for k, (hemi, roi) in enumerate(jobs):
    sources, too_small = training_data.pooled_sources(subjects_data, hemi, roi)
    job = {"hemisphere": hemi, "roi": roi, "subjects": " ".join(str(s.subject) for s in sources),
           "voxels": sum(len(s.voxel_indices) for s in sources)}
    if not sources:
        rows.append({**job, "status": f"skipped: no subject has >= {training_data.MIN_ROI_VOXELS} voxels"})
        continue
    run_dir = models.pooled_checkpoint_path(out_dir, "reg", hemi, roi, exclude_subject or None).parent
    summary = training.train_roi_model("reg", sources, run_dir, settings, config, runtime,
                                       desc=f"[{k + 1}/{len(jobs)}] pooled reg {hemi} {roi}")
    rows.append({**job, **{key: v for key, v in summary.items() if key not in ("method", "subjects", "voxels")}})

# summary
if runtime.is_main:
    table_path = training.pooled_sweep_summary_path(out_dir, "reg", None, exclude_subject, shard_index)
    outputs.save_csv(table_path, rows, config)
    print(outputs.format_table(rows, float_format="{:.4g}"))
    print(f"summary saved to {table_path}")
runtime.close()
