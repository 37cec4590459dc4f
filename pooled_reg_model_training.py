"""Fine-tune one AlexNet by regression on several subjects at once (pooled reg) for one hemisphere and ROI.

The baseline to pooled CL (the original has none): a shared AlexNet and one linear read-out to each subject's
ROI voxels, trained with MSE. Every batch holds one subject's images; the subjects' batches are interleaved in a
seeded random order (subject_order="sequential": all of the first subject's batches, then the next subject's,
...). Trains on every subject's train split (the NSD-keyed split: an image shown to several subjects is in the
same split for all) and keeps the epoch with the lowest mean of the subjects' val losses (MSE).
--exclude_subject=s trains the leave-one-subject-out model without s (s's files are never opened). Writes
out_dir/models/pooled-reg/<hemi>/<roi>/[loso-subjXX/]{best.pt,last.pt,log.csv,done.json}.
Runs unchanged under `torchrun --nproc_per_node=N pooled_reg_model_training.py ...` (batch_size is the global batch).
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                # everything derived goes here (splits, image caches, models)
subjects = []                  # subjects to pool; [] = every subject in data_dir (those whose ROI has >= 20 voxels)
exclude_subject = 0            # leave-one-subject-out: train without this subject (0 = none)
hemisphere = "lh"              # "lh" or "rh"
roi = "FFA-1"                  # one of the 31 challenge ROIs
subject_order = "interleaved"  # "interleaved": subjects' batches in seeded random order; "sequential": one by one
epochs = 75                    # training epochs (as the per-subject reg models: 75)
batch_size = 1024              # global batch size, split over ranks under torchrun
lr = 2.5e-5                    # Adam learning rate (as the per-subject reg models: 2.5e-5)
lr_schedule = "plateau"        # "plateau": ReduceLROnPlateau on the mean val loss; "none": constant lr
lr_patience = 3                # plateau: epochs without val-loss improvement before the lr drops
lr_factor = 0.1                # plateau: lr multiplier
backbone = "alexnet"           # "alexnet" (the paper's); "tiny" is a small stand-in network for fast tests
weights = "IMAGENET1K_V1"      # "IMAGENET1K_V1" (torchvision cache), "none" (random init) or a local .pth state dict
dropout = 0.5                  # AlexNet classifier dropout (torchvision default; 0 makes DDP runs match 1 process)
image_size = 224               # input size in px (PNGs decoded once into each subject's image cache at this size)
hflip = False                  # random horizontal flips (off: a flip swaps the visual hemifields)
device = "auto"                # "auto" (cuda if present), "cpu", "cuda", "cuda:1"
amp = True                     # bfloat16 autocast on GPU
cpu_bf16 = True                # bfloat16 autocast on CPU where it has bf16 instructions (~1.6x faster there)
channels_last = True           # channels-last memory format for the conv layers (measured faster on CPU)
loader_workers = 0             # DataLoader worker processes; 0: one reader thread in this process (measured faster)
num_threads = 0                # torch CPU threads (0 = torch default)
seed = 0                       # model init, batch order, dropout
split_seed = 0                 # train/val/test split seed (shared by every stage)
resume = False                 # continue an interrupted run from last.pt (exact)
stop_after_epoch = 0           # stop after this epoch without finishing (0 = train all epochs)
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

# data: each pooled subject's split, memory-mapped image cache and ROI fMRI; the excluded subject is never read
(roi,) = utils.check_roi_names([roi])
candidates = training_data.pooled_candidates(data_dir, subjects, exclude_subject)
subjects_data = [utils.load_subject(data_dir, s, out_dir, image_size, split_seed, [hemisphere], check_values,
                                    build_first=runtime.main_first) for s in candidates]
sources, too_small = training_data.pooled_sources(subjects_data, hemisphere, roi)
if not sources:
    raise options.DataError(f"{hemisphere} {roi}: no subject among {candidates} has at least "
                          f"{training_data.MIN_ROI_VOXELS} voxels ({too_small})")
run_dir = models.pooled_checkpoint_path(out_dir, "reg", hemisphere, roi, exclude_subject or None).parent
if runtime.is_main:
    print(f"pooled reg {hemisphere} {roi}: subjects " + ", ".join(
        f"{s.subject} ({len(s.voxel_indices)} voxels, {len(s.split['train'])} train / {len(s.split['val'])} val)"
        for s in sources) + (f"; left out for < {training_data.MIN_ROI_VOXELS} voxels: {too_small}" if too_small
                             else "") + f"; {runtime.world_size} x {runtime.device}")

# the loop over epochs: training.train_roi_model (restore or init, one epoch, evaluate, save)
summary = training.train_roi_model("reg", sources, run_dir, settings, config, runtime,
                                   desc=f"pooled reg {hemisphere} {roi}")

# report
if runtime.is_main:
    print(outputs.format_table([{"hemisphere": hemisphere, "roi": roi, **summary}], float_format="{:.4g}"))
    print(f"checkpoints and log in {run_dir}")
runtime.close()
