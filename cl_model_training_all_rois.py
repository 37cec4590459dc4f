"""Fine-tune a contrastive (CL) model for every ROI (and seed) of one subject, or pooled over subjects: a sweep.

The training options (epochs, lr, backbone, ...) are those of cl_model_training.py, settable here the same way.
Loads the image caches and fMRI once for all ROIs. Models already finished (done.json) are skipped and a half-trained
one resumes exactly from its last.pt, so a killed sweep restarts where it stopped; ROIs under 20 voxels are listed as
skipped (pooled: an ROI pools the subjects that have >= 20 voxels). --shard=i/n takes every n-th (hemisphere, ROI,
seed) job from job i, so n processes or a Slurm array (--shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) split
a sweep without coordination. Ends with a table of the jobs (voxels, best val metric, minutes), saved as
out_dir/models/<backbone>/cl/summary_subjXX[_shard-i-of-n].csv (pooled: .../pooled-cl-*/summary[_loso-subjXX]...).
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
subjects = [1]                 # one subject: its models; several, or all: models pooled over them
exclude_subject = 0            # pooled: leave this subject out (leave-one-subject-out models; 0 = none)
hemispheres = ["lh", "rh"]     # hemispheres to sweep
rois = []                      # ROIs to sweep; [] = all 31
seeds = [0]                    # one model per seed and ROI
shard = "0/1"                  # i/n: this process trains jobs i, i+n, i+2n, ... of the sweep
resume = True                  # skip finished models and resume half-trained ones (false: retrain everything)
# ---------------------------------------------------------------------
import options

config = options.apply_options(globals(), defaults_from="cl_model_training.py")

from dataclasses import replace  # noqa: E402

import outputs  # noqa: E402
import paths  # noqa: E402
import training  # noqa: E402
import training_data  # noqa: E402
import utils  # noqa: E402
from runtime import setup_runtime  # noqa: E402

# runtime: the device, and torch.distributed when launched by torchrun
runtime = setup_runtime(config["device"], config["num_threads"])
subject_list, pooled = training_data.training_subjects(config["data_dir"], subjects, exclude_subject)
settings = training.TrainSettings.from_options(config, pooled)
shard_index = training.parse_shard(shard)
jobs = training.sweep_jobs(hemispheres, rois, seeds, shard_index)

# data: every subject's split, image cache and fMRI, loaded once for every ROI (an excluded subject is never read)
subjects_data = [utils.load_subject(config["data_dir"], s, config["out_dir"], config["image_size"],
                                    config["split_seed"], sorted({h for h, _, _ in jobs}), config["check_values"],
                                    fmri_in_ram=not pooled, build_first=runtime.main_first) for s in subject_list]

# the loop over (hemisphere, ROI, seed) jobs: finished ones skipped, half-trained ones resumed, small ROIs listed
rows = []
for k, (hemi, roi, seed) in enumerate(jobs):
    sources, too_small = training_data.trainable_sources(subjects_data, hemi, roi, config["min_voxels"])
    job = {"hemisphere": hemi, "roi": roi, "seed": seed, "subjects": " ".join(str(s.subject) for s in sources),
           "voxels": sum(len(s.voxel_indices) for s in sources)}
    if not sources:
        rows.append({**job, "status": "skipped: " + ", ".join(f"subject {s}: {n} voxels" for s, n in
                                                          too_small.items()) + f" (< {config['min_voxels']})"})
        continue
    run_dir = paths.model_dir(config["out_dir"], "cl", hemi, roi, subject=None if pooled else subject_list[0],
                              seed=seed, backbone=settings.backbone, exclude_subject=exclude_subject or None,
                              pooled_h_method=config["pooled_h_method"])
    summary = training.train_roi_model("cl", sources, run_dir, replace(settings, seed=seed), config, runtime,
                                       desc=f"[{k + 1}/{len(jobs)}] {'pooled ' if pooled else ''}cl {hemi} {roi} "
                                            f"seed {seed}")
    rows.append({**job, **{key: v for key, v in summary.items() if key not in ("method", "subjects", "voxels")}})

# summary
if runtime.is_main:
    table_path = paths.sweep_summary_file(config["out_dir"], "cl", subject=None if pooled else subject_list[0],
                                          backbone=settings.backbone, exclude_subject=exclude_subject or None,
                                          pooled_h_method=config["pooled_h_method"], shard=shard_index)
    outputs.save_csv(table_path, rows, config)
    print(outputs.format_table(rows, float_format="{:.4g}"))
    print(f"summary saved to {table_path}")
runtime.close()
