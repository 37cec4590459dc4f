"""Map every cortical vertex to the challenge ROIs it belongs to, for each subject and hemisphere.

Writes out_dir/voxel_roi_mappings/subjXX/{lh,rh}_voxel_roi_mappings.json (one list of ROI names per
vertex) and {lh,rh}_roi_indices.npz (ROI name -> vertex indices), and prints ROI sizes.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                             # everything derived goes here
subjects = []                               # subjects to map; [] = every subject in data_dir
check_values = True                         # scan the fMRI for NaN/inf before writing
# ---------------------------------------------------------------------
import options

config = options.apply_options(globals())

from pathlib import Path  # noqa: E402

import outputs  # noqa: E402
import paths  # noqa: E402
import utils  # noqa: E402


def format_roi_size_table(sizes: dict) -> str:
    """Text table of ROI voxel counts: rows ROIs, columns (subject, hemi); empty ROIs marked."""
    columns = sorted(sizes)
    header = f"{'ROI':<12}" + "".join(f"{paths.subject_dir_name(s) + ' ' + h:>12}" for s, h in columns)
    lines = [header, "-" * len(header)]
    row_names = list(utils.ROI_NAMES) + sorted({k for c in columns for k in sizes[c]} - set(utils.ROI_NAMES))
    for name in row_names:
        cells = [sizes[c].get(name) for c in columns]
        lines.append(f"{name:<12}" + "".join(f"{'empty' if v == 0 else ('-' if v is None else v):>12}"
                                             for v in cells))
    return "\n".join(lines)


subject_list = utils.resolve_subjects(data_dir, subjects)
# validate every subject before writing anything
subject_data = {s: utils.load_subject(data_dir, s, check_values=check_values) for s in subject_list}

sizes = {}
for subject, d in subject_data.items():
    subject_out = paths.mappings_dir(out_dir, subject)
    for hemi in utils.HEMISPHERES:
        indices = d.roi_voxel_indices[hemi]
        voxel_rois = utils.voxel_roi_lists(indices, d.n_vertices[hemi])
        outputs.save_json(subject_out / f"{hemi}_voxel_roi_mappings.json", voxel_rois, config, subject=subject)
        outputs.save_npz(subject_out / f"{hemi}_roi_indices.npz", indices, config, subject=subject)
        sizes[(subject, hemi)] = {name: len(idx) for name, idx in indices.items()}
        sizes[(subject, hemi)]["(vertices)"] = d.n_vertices[hemi]

print(format_roi_size_table(sizes))
print(f"wrote voxel-ROI mappings of {len(subject_list)} subject(s) to {Path(out_dir) / 'voxel_roi_mappings'}")
