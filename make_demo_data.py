"""Write a synthetic dataset in the official Algonauts 2023 layout so the whole pipeline runs without the download.

Real ROI masks (mask_bundle.py), photo-like images (synthetic_images.py) and voxel responses from a known
ground-truth model per ROI family (synthetic_data.py); the noise ceilings and per-image categories are saved too.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
out_dir = "demo_data"        # the synthetic dataset is written here (official Algonauts 2023 layout + imagefolder/)
subjects = [1, 2]            # NSD subjects (1-8) whose real vertex counts and ROI masks are used
n_train_images = 600         # training images (with fMRI) per subject
n_test_images = 20           # challenge-style test images (no fMRI) per subject
image_px = 425               # side of the square RGB PNGs in pixels (NSD / Algonauts: 425)
shared_fraction = 0.25       # fraction of each subject's training images seen by all subjects (as NSD's shared ones)
noise_level = 1.0            # scales the sd of the fMRI noise (0 = noiseless, 2 = twice as noisy)
imagefolder_per_class = 40   # images per class in out_dir/imagefolder/<class>/ (for classification probes)
imagefolder_px = 128         # side of the ImageFolder PNGs in pixels
seed = 0                     # one seed for images, voxel tuning and noise (same seed -> identical dataset)
mask_source = ""             # "" = bundled copy of the real masks (demo_assets/); else a folder of subjXX folders
rebuild_mask_bundle = False  # true: rebuild demo_assets/ from mask_source (maintainers, once) and stop
overwrite = False            # true: replace an existing complete dataset in out_dir
workers = 0                  # processes drawing and encoding images (0 = one per CPU core)
# ---------------------------------------------------------------------
import sys
import time

import mask_bundle
import options
import synthetic_data

if __name__ == "__main__":
    config = options.apply_options(globals())
    started = time.time()
    if rebuild_mask_bundle:
        if not mask_source:
            raise options.DataError("--rebuild_mask_bundle=true needs --mask_source=<folder of subjXX mask folders>")
        written = mask_bundle.rebuild(mask_source, mask_bundle.ASSETS_DIR, config)
        print(f"wrote {', '.join(f'{p} ({p.stat().st_size / 1024:.0f} KB)' for p in written)} from {mask_source}")
        sys.exit(0)
    dataset_dir, info = synthetic_data.build(config)
    if info is None:
        print(f"{dataset_dir}: a complete demo dataset is already there (pass --overwrite=true to rebuild)")
        sys.exit(0)
    print(f"wrote a synthetic Algonauts-2023-style dataset to {dataset_dir} in {time.time() - started:.0f} s")
    print(f"  subjects {info['subjects']}: {info['n_train_images']} training images each "
          f"({info['n_shared_images']} shared), {info['n_test_images']} test images, {info['image_px']} px")
    for s2, counts in info["n_vertices"].items():
        print(f"  {s2}: " + ", ".join(f"{h} {v} vertices" for h, v in counts.items()))
    print(f"  imagefolder: {info['imagefolder_per_class']} images per class ({', '.join(info['categories'])}) "
          f"in {dataset_dir / 'imagefolder'}")
    print(f"  use it with --data_dir={dataset_dir}")
