"""Fine-tune a regression (reg) AlexNet for every ROI of a subject, one hemisphere after the other.

Loads the image cache and fMRI once for all ROIs. ROIs already finished (done.json) are skipped and a
half-trained ROI resumes from its last.pt, so a killed sweep restarts where it stopped; ROIs under 20 voxels
are listed as skipped. --shard=i/n takes every n-th (hemisphere, ROI) job from job i, so n processes or a Slurm
array (--shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) split a sweep without coordination.
Ends with a table of ROI, voxels, best val metric and minutes, saved as
out_dir/models/reg/subjXX/summary[_shard-i-of-n].csv.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                # everything derived goes here (split, image cache, models)
subject = 1                    # subject number
hemispheres = ["lh", "rh"]     # hemispheres to sweep
rois = []                      # ROIs to sweep; [] = all 31
shard = "0/1"                  # i/n: this process trains jobs i, i+n, i+2n, ... of the sweep
resume = True                  # skip finished ROIs and resume half-trained ones (false: retrain everything)
epochs = 75                    # training epochs (paper: 75)
batch_size = 1024              # global batch size (paper: 1024)
lr = 2.5e-5                    # Adam learning rate (paper: 2.5e-5)
lr_schedule = "plateau"        # "plateau": ReduceLROnPlateau on val loss (2023 code); "none": constant lr (latest code)
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
slim_finished = True           # drop optimizer state from last.pt once done (~0.5 GB less per ROI)
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

# data: the subject's split, image cache and fMRI, loaded once for every ROI
subject_data = utils.load_subject(data_dir, subject, out_dir, image_size, split_seed, sorted({h for h, _ in jobs}),
                                  check_values, fmri_in_ram=True, build_first=runtime.main_first)

# the loop over (hemisphere, ROI) jobs: finished ones skipped, half-trained ones resumed, small ROIs listed
rows = []
for k, (hemi, roi) in enumerate(jobs):
    n_voxels = len(subject_data.roi_voxel_indices[hemi][roi])
    job = {"hemisphere": hemi, "roi": roi, "voxels": n_voxels}
    if n_voxels < training_data.MIN_ROI_VOXELS:
        rows.append({**job, "status": f"skipped: {n_voxels} voxels (< {training_data.MIN_ROI_VOXELS})"})
        continue
    source = training_data.roi_source(subject_data, hemi, roi)
    run_dir = models.checkpoint_path(out_dir, "reg", subject, hemi, roi).parent
    summary = training.train_roi_model("reg", [source], run_dir, settings, config, runtime,
                                       desc=f"[{k + 1}/{len(jobs)}] reg {hemi} {roi}")
    rows.append({**job, **{key: v for key, v in summary.items() if key not in ("method", "voxels")}})

# summary
if runtime.is_main:
    table_path = training.sweep_summary_path(out_dir, "reg", subject, shard_index)
    outputs.save_csv(table_path, rows, config)
    print(outputs.format_table(rows, float_format="{:.4g}"))
    print(f"summary saved to {table_path}")
runtime.close()
