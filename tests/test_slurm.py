"""slurm/study.sbatch: every array task of a stage runs a distinct shard, and together they cover the stage."""
from __future__ import annotations

import itertools
import os
import subprocess

from conftest import REPO


def commands(tmp_path, stage: str, tasks: int) -> list[str]:
    """The command each task would run (a stand-in `python` on PATH prints its arguments)."""
    (tmp_path / "python").write_text("#!/bin/sh\necho \"$@\"\n")
    (tmp_path / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DATA": "/d", "OUT": "/o", "STAGE": stage,
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    return [subprocess.run(["bash", str(REPO / "slurm" / "study.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": str(k)},
                           capture_output=True, text=True, check=True).stdout.strip() for k in range(tasks)]


def test_training_tasks_cover_every_subject_method_and_shard_once(tmp_path):
    runs = commands(tmp_path, "train", 64)
    parsed = {(c.split()[0], next(a for a in c.split() if a.startswith("--subjects=")),
               next(a for a in c.split() if a.startswith("--shard="))) for c in runs}
    expected = {(f"{m}_model_training_all_rois.py", f"--subjects={s}", f"--shard={k}/4")
                for m, s, k in itertools.product(("cl", "reg"), range(1, 9), range(4))}
    assert parsed == expected and len(runs) == 64


def test_pooled_tasks_cover_all_subjects_and_each_left_out_subject(tmp_path):
    runs = commands(tmp_path, "pooled", 72)
    parsed = {(c.split()[0], next(a for a in c.split() if a.startswith("--exclude_subject=")),
               next(a for a in c.split() if a.startswith("--shard="))) for c in runs}
    expected = {(f"{m}_model_training_all_rois.py", f"--exclude_subject={s}", f"--shard={k}/4")
                for m, s, k in itertools.product(("cl", "reg"), range(0, 9), range(4))}
    assert parsed == expected and all("--subjects=all" in c for c in runs)
