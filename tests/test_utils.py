"""Foundation: options, both layouts, restricted unpickling, validation errors, split, image cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import image_cache
import options
import outputs
import paths
import utils
from conftest import REPO, make_tiny_dataset


# ---- options ---------------------------------------------------------------------------------

def test_options_parse_types_lists_bools_and_config(tmp_path):
    g = {"epochs": 30, "lr": 1e-4, "amp": True, "rois": ["FFA-1"], "subjects": [1], "name": "x",
         "extra": None, "utils": utils, "_private": 1}
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": 5, "lr": 1}))
    opts = options.apply_options(g, [f"--config={cfg}", "--amp=false", "--rois=V1v,PPA", "--subjects=2,3",
                                   "--name=run 1", "--extra=[1, 2]"])
    assert opts == {"epochs": 5, "lr": 1.0, "amp": False, "rois": ["V1v", "PPA"], "subjects": [2, 3],
                    "name": "run 1", "extra": [1, 2]}
    assert g["epochs"] == 5 and isinstance(g["lr"], float) and g["subjects"] == [2, 3]


@pytest.mark.parametrize("argv, message", [
    (["--epoch=3"], r"unknown option --epoch \(did you mean --epochs\?\); --help lists the options"),
    (["--epochs=three"], "expected int"),
    (["--amp=maybe"], "expected true or false"),
    (["epochs=3"], "not of the form --name=value"),
])
def test_options_errors_name_valid_choices(argv, message):
    with pytest.raises(options.OptionsError, match=message):
        options.apply_options({"epochs": 30, "amp": True}, argv)


def test_help_prints_every_option_with_its_comment_before_torch_is_imported():
    code = ("import runpy, sys; sys.argv = ['cl_model_training_all_rois.py', '--help']\n"
            "try:\n    runpy.run_path('cl_model_training_all_rois.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert lines[-1] == "torch imported: False"
    text = "\n".join(lines)
    # its own options, then those of the training script, in command-line syntax with their comments
    assert "--hemispheres=lh,rh" in text and "--rois=[]" in text and "--resume=true" in text
    assert "options taken from cl_model_training.py" in text
    epochs = next(line for line in lines if line.strip().startswith("--epochs="))
    assert epochs.split()[0] == "--epochs=30" and "training epochs (paper: 30)" in epochs
    assert not any(line.strip().startswith(("--roi=", "--hemisphere=")) for line in lines)  # replaced by plurals
    # a comment continued on the next line is part of the option's help
    layer = next(line for line in options.help_text(REPO / "generate_results.py").splitlines()
                 if line.strip().startswith("--tuned_layer="))
    assert "a layer name for every tuned set" in layer


def test_a_sweep_takes_its_training_scripts_options():
    sweep = {"subjects": [1], "hemispheres": ["lh"], "rois": [], "resume": True, "__file__": str(REPO / "reg_model_training_all_rois.py")}
    chosen = options.apply_options(sweep, ["--epochs=3", "--lr=0.5", "--rois=V1v"],
                                   defaults_from="reg_model_training.py")
    assert chosen["epochs"] == 3 and chosen["lr"] == 0.5 and chosen["rois"] == ["V1v"] and chosen["resume"] is True
    assert "roi" not in chosen and "hemisphere" not in chosen and chosen["weights"] == "DEFAULT"
    assert options.script_defaults(REPO / "reg_model_training_all_rois.py")["epochs"] == 75


# ---- layouts and ROI masks -------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["official", "rearranged"])
def test_both_layouts_are_found_and_agree(tmp_path, layout):
    root = make_tiny_dataset(tmp_path / layout, layout=layout)
    assert utils.list_subjects(root) == [1, 2]
    paths = utils.find_subject(root, 2)
    assert paths.layout == layout
    info = utils.validate_subject(paths)
    assert info["n_images"] == 48 and info["n_vertices"] == {"lh": 240, "rh": 240}
    fmri = utils.load_fmri(paths, "lh")
    assert isinstance(fmri, np.memmap) and fmri.dtype == np.float32 and fmri.shape == (48, 240)
    # Both layouts hold byte-identical data for the same seed.
    other = make_tiny_dataset(tmp_path / "other", layout="rearranged" if layout == "official" else "official")
    np.testing.assert_array_equal(fmri, utils.load_fmri(utils.find_subject(other, 2), "lh"))


def test_missing_subject_error_says_what_was_looked_for(tmp_path):
    with pytest.raises(options.DataError, match=r"subject 3 not found .*subj03/training_split.*training_fmri/Subj3"):
        utils.find_subject(make_tiny_dataset(tmp_path / "d"), 3)


def test_roi_names_stripped_and_unknown_rejected(tmp_path):
    root = make_tiny_dataset(tmp_path / "d", subjects=(1,))
    paths = utils.find_subject(root, 1)
    np.save(paths.mapping_path("floc-faces"),
            np.array({0: "Unknown", 1: " OFA", 2: "FFA-1 ", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"}, dtype=object))
    masks = utils.load_roi_masks(paths, "lh", 240)
    assert list(masks) == list(utils.ROI_NAMES) and masks["OFA"].sum() == 30
    assert utils.check_roi_names([" PPA "]) == ["PPA"]
    with pytest.raises(options.DataError, match="unknown ROI 'FFA'; valid ROIs: V1v"):
        utils.check_roi_names(["FFA"])


# ---- restricted unpickler --------------------------------------------------------------------

class _RunsCode:
    """Pickles to a call of os.system: what a malicious mapping file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_reads_official_and_rejects_code(tmp_path):
    good = tmp_path / "mapping_floc-faces.npy"
    np.save(good, np.array({0: "Unknown", 1: "OFA", 2: "FFA-1"}, dtype=object))
    assert utils.load_roi_mapping(good) == {0: "Unknown", 1: "OFA", 2: "FFA-1"}

    marker = tmp_path / "code_ran"
    evil = tmp_path / "mapping_evil.npy"
    np.save(evil, np.array({0: _RunsCode(marker)}, dtype=object))
    with pytest.raises(options.DataError, match="refusing to unpickle posix.system"):
        utils.load_roi_mapping(evil)
    assert not marker.exists()
    # The file really is dangerous: an unrestricted load runs the command.
    subprocess.run([sys.executable, "-c", f"import numpy as np; np.load({str(evil)!r}, allow_pickle=True)"],
                   check=True)
    assert marker.exists()


def test_real_mapping_files_load_with_restricted_unpickler():
    shared = REPO.parent / "shared" / "algonauts_roi_masks" / "subj01"
    if not shared.is_dir():
        pytest.skip(f"{shared} not here: the real masks beside the repo exist on the maintainers' machine only")
    for family in utils.ROI_FAMILIES:
        mapping = utils.load_roi_mapping(shared / f"mapping_{family}.npy")
        assert set(mapping.values()) - {"Unknown"} == set(utils.ROIS_BY_FAMILY[family])


# ---- validation errors: one clear line, non-zero exit, nothing written ------------------------

def _break(kind: str, root: Path) -> str:
    """Corrupt subject 1 of a tiny dataset in one way; return the text the error must contain."""
    paths = utils.find_subject(root, 1)
    if kind == "image_count":
        utils.list_images(paths.train_images)[-1].unlink()
        return "lh_training_fmri.npy: 48 fMRI rows, expected 47"
    if kind == "mask_length":
        np.save(paths.mask_path("rh", "floc-places"), np.zeros(239, dtype=np.int64))
        return "rh.floc-places_challenge_space.npy: mask has 239 vertices, expected 240"
    if kind == "nan":
        fmri = np.load(paths.fmri["rh"])
        fmri[5, 7] = np.nan
        np.save(paths.fmri["rh"], fmri)
        return "rh_training_fmri.npy: non-finite value (NaN or inf) at row 5, column 7"
    if kind == "missing_hemisphere":
        paths.fmri["rh"].unlink()
        return "rh_training_fmri.npy: rh training fMRI file not found"
    if kind == "truncated_png":
        image = utils.list_images(paths.train_images)[7]
        image.write_bytes(image.read_bytes()[:200])
        return f"{image.name}: truncated or not a PNG"
    if kind == "wrong_shape":
        np.save(paths.fmri["lh"], np.zeros(48, dtype=np.float32))
        return "expected a 2-D images x vertices array, found shape (48,)"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["image_count", "mask_length", "nan", "missing_hemisphere", "wrong_shape",
                                  "truncated_png"])
def test_validation_errors_exit_nonzero_with_one_line_and_write_nothing(tmp_path, kind):
    root = make_tiny_dataset(tmp_path / "d")
    expected = _break(kind, root)
    with pytest.raises(options.DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        utils.validate_subject(utils.find_subject(root, 1))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "generate_voxel_roi_mappings.py"),
                           f"--data_dir={root}", f"--out_dir={out}"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr
    assert not out.exists()  # subject 2 is fine, but nothing is written before every subject validates


def test_truncated_png_is_named_and_leaves_no_cache(tmp_path):
    root = make_tiny_dataset(tmp_path / "d", subjects=(1,))
    images = utils.list_images(utils.find_subject(root, 1).train_images)
    data = images[3].read_bytes()
    images[3].write_bytes(data[: len(data) // 2])
    with pytest.raises(options.DataError, match=f"{images[3].name}: unreadable or truncated image"):
        image_cache.load_image_cache(tmp_path / "out", 1, images, size=32)
    assert not any((tmp_path / "out" / "image_cache").iterdir())


# ---- split -----------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    root = make_tiny_dataset(tmp_path / "d", n_images=400, subjects=(1,))
    images = utils.list_images(utils.find_subject(root, 1).train_images)
    a, b = utils.make_split(images, seed=3), utils.make_split(images, seed=3)
    for name in utils.SPLIT_NAMES:
        np.testing.assert_array_equal(a[name], b[name])
    allidx = np.concatenate([a[n] for n in utils.SPLIT_NAMES])
    assert np.array_equal(np.sort(allidx), np.arange(400))  # disjoint and complete
    sizes = [len(a[n]) / 400 for n in utils.SPLIT_NAMES]
    assert sizes == pytest.approx([0.75, 0.10, 0.15], abs=0.06)
    c = utils.make_split(images, seed=4)
    assert not np.array_equal(a["test"], c["test"])


def test_split_written_once_and_read_by_every_stage(tmp_path):
    root = make_tiny_dataset(tmp_path / "d", subjects=(1,))
    images = utils.list_images(utils.find_subject(root, 1).train_images)
    first = utils.get_split(tmp_path / "out", 1, images, seed=0)
    again = utils.get_split(tmp_path / "out", 1, images, seed=99)  # later stage, other seed: saved split wins
    for name in utils.SPLIT_NAMES:
        np.testing.assert_array_equal(first[name], again[name])
    with pytest.raises(options.DataError, match="split was made for a different image list"):
        utils.get_split(tmp_path / "out", 1, images[:-1])


def test_shared_nsd_images_fall_in_the_same_split_for_every_subject(tmp_path):
    names_a = [tmp_path / f"train-{i + 1:04d}_nsd-{nsd:05d}.png" for i, nsd in enumerate(range(100, 600))]
    names_b = [tmp_path / f"train-{i + 1:04d}_nsd-{nsd:05d}.png" for i, nsd in enumerate(range(350, 900))]
    sa, sb = utils.make_split(names_a), utils.make_split(names_b)
    which_a = {100 + i: n for n in utils.SPLIT_NAMES for i in sa[n]}
    which_b = {350 + i: n for n in utils.SPLIT_NAMES for i in sb[n]}
    shared = set(which_a) & set(which_b)
    assert len(shared) == 250 and all(which_a[k] == which_b[k] for k in shared)


# ---- image cache -----------------------------------------------------------------------------

def test_image_cache_matches_pil_is_reused_and_rebuilt(tmp_path):
    from PIL import Image
    root = make_tiny_dataset(tmp_path / "d", subjects=(1,), n_images=12)
    images = utils.list_images(utils.find_subject(root, 1).train_images)
    out = tmp_path / "out"
    cache = image_cache.load_image_cache(out, 1, images, size=64)
    assert isinstance(cache, np.memmap) and cache.shape == (12, 3, 64, 64) and cache.dtype == np.uint8
    expected = np.asarray(Image.open(images[5]).convert("RGB").resize((64, 64), Image.BILINEAR))
    np.testing.assert_array_equal(cache[5], expected.transpose(2, 0, 1))

    path = paths.image_cache_file(out, 1, 64)
    stamp = path.stat().st_mtime_ns
    image_cache.load_image_cache(out, 1, images, size=64)
    assert path.stat().st_mtime_ns == stamp  # reused

    image_cache.load_image_cache(out, 1, images[:10], size=64)  # image list changed: rebuilt
    assert path.stat().st_mtime_ns != stamp and np.load(path, mmap_mode="r").shape[0] == 10

    other = image_cache.load_image_cache(out, 1, images, size=32)  # another size: its own cache
    assert other.shape == (12, 3, 32, 32) and paths.image_cache_file(out, 1, 32).is_file()


# ---- atomic outputs --------------------------------------------------------------------------

def test_atomic_write_leaves_old_file_on_failure_and_writes_sidecar(tmp_path):
    target = tmp_path / "table.npy"
    outputs.save_npy(target, np.arange(3), {"alpha": 1.0})
    assert json.loads(outputs.sidecar_path(target).read_text())["options"] == {"alpha": 1.0}

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        outputs.atomic_write(target, boom)
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta", "table.npy"]
    assert [p.name for p in (tmp_path / "meta").iterdir()] == ["table.npy.json"]


@pytest.mark.parametrize("error, cause", [
    (OSError(28, "No space left on device"), "disk full"),
    (PermissionError(13, "Permission denied"), "permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "a full disk is the usual")])
def test_failed_write_is_one_line_naming_the_file_and_cause(tmp_path, error, cause):
    """A full disk or a refused write (an OSError, or torch.save's RuntimeError) -> one DataError line naming the
    file and the cause; the temp file is gone and an existing output is untouched."""
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")

    def fail(fh):
        fh.write(b"partial")
        raise error

    with pytest.raises(options.DataError) as info:
        outputs.atomic_write(target, fail)
    message = str(info.value)
    assert message.startswith(f"{target}: could not be written") and cause in message and "\n" not in message
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_sectioned_config_sets_each_scripts_options(tmp_path):
    """configs/original_2023.json style: 'all' keys where a script has them, a script's own section, typos refused."""
    cl_defaults = options.script_defaults(REPO / "cl_model_training.py")
    results_defaults = options.script_defaults(REPO / "generate_results.py")
    cfg = tmp_path / "protocol.json"
    cfg.write_text(json.dumps({"all": {"lr_schedule": "none", "checkpoint": "last"},
                               "generate_results.py": {"tuned_layer": "untuned"}}))
    assert options.read_config(cfg, "cl_model_training.py", cl_defaults) == {"lr_schedule": "none"}
    assert options.read_config(cfg, "generate_results.py", results_defaults) == {"checkpoint": "last",
                                                                                  "tuned_layer": "untuned"}
    original = options.read_config(REPO / "configs" / "original_2023.json", "generate_results.py", results_defaults)
    assert original["tuned_layer"] == "untuned" and original["alpha_mode"] == "untuned-per-roi"
    for bad, message in (({"all": {"lr_schedul": "none"}}, "option of no script"),
                         ({"generate_results.py": {"epochs": 3}}, "has no option 'epochs'"),
                         ({"nope.py": {}}, "names no script")):
        cfg.write_text(json.dumps(bad))
        with pytest.raises(options.OptionsError, match=message):
            options.read_config(cfg, "cl_model_training.py", cl_defaults)


def test_the_original_config_sets_valid_options_of_every_script():
    config = REPO / "configs" / "original_2023.json"
    for script in sorted(REPO.glob("*.py")):
        defaults = options.script_defaults(script)
        if not defaults or script.name in ("make_demo_data.py",):
            continue
        chosen = options.read_config(config, script.name, defaults)
        assert all(k in defaults for k in chosen)
    training_options = options.read_config(config, "reg_model_training_all_rois.py",
                                           options.script_defaults(REPO / "reg_model_training_all_rois.py"))
    assert training_options["fit_split"] == "train+val" and training_options["batching"] == "remainder"
    assert training_options["min_voxels"] == 1 and training_options["keep_last"] is True
