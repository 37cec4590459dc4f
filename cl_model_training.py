"""Fine-tune AlexNet contrastively (CL) for one subject, hemisphere and ROI (Mulrooney & Brockmeier).

AlexNet's 1000 outputs and the ROI's fMRI are projected to h = 0.8 V dimensions, passed through one shared
MLP head to z = 0.2 V, and trained so each image's embedding is closest (cosine, temperature t) to its own fMRI.
Trains on the train split, selects on val (lowest val loss); writes
out_dir/models/cl/subjXX/<hemi>/<roi>/{best.pt,last.pt,log.csv,done.json}.
Runs unchanged under `torchrun --nproc_per_node=N cl_model_training.py ...` (DDP; batch_size is the global batch).
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                # everything derived goes here (split, image cache, models)
subject = 1                    # subject number
hemisphere = "lh"              # "lh" or "rh"
roi = "FFA-1"                  # one of the 31 challenge ROIs
epochs = 30                    # training epochs (paper: 30)
batch_size = 1024              # global batch size, split over ranks under torchrun (paper: 1024)
lr = 1e-4                      # Adam learning rate (paper: 1e-4)
temperature = 0.3              # contrastive temperature t (paper: 0.3)
symmetric_loss = False         # also average the fMRI->image direction (CLIP style); paper: image direction only
lr_schedule = "plateau"        # "plateau": ReduceLROnPlateau on val loss (2023 code); "none": constant lr (latest code)
lr_patience = 3                # plateau: epochs without val-loss improvement before the lr drops
lr_factor = 0.1                # plateau: lr multiplier
backbone = "alexnet"           # "alexnet" (the paper's); "tiny" is a small stand-in network for fast tests
weights = "IMAGENET1K_V1"      # "IMAGENET1K_V1" (torchvision cache), "none" (random init) or a local .pth state dict
dropout = 0.5                  # AlexNet classifier dropout (torchvision default; 0 makes DDP runs match 1 process)
image_size = 224               # input size in px (PNGs decoded once into the image cache at this size)
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

# data: the subject's split, image cache and this ROI's fMRI (rank 0 builds the caches first)
(roi,) = utils.check_roi_names([roi])
subject_data = utils.load_subject(data_dir, subject, out_dir, image_size, split_seed, [hemisphere], check_values,
                                  build_first=runtime.main_first)
source = training_data.roi_source(subject_data, hemisphere, roi)
run_dir = models.checkpoint_path(out_dir, "cl", subject, hemisphere, roi).parent
if runtime.is_main:
    print(f"cl subject {subject} {hemisphere} {roi}: {len(source.voxel_indices)} voxels, "
          f"{len(subject_data.split['train'])} train / {len(subject_data.split['val'])} val images, "
          f"{runtime.world_size} x {runtime.device}")

# the loop over epochs: training.train_roi_model (restore or init, one epoch, evaluate, save)
summary = training.train_roi_model("cl", [source], run_dir, settings, config, runtime)

# report
if runtime.is_main:
    print(outputs.format_table([{"hemisphere": hemisphere, "roi": roi, **summary}], float_format="{:.4g}"))
    print(f"checkpoints and log in {run_dir}")
runtime.close()
