"""Launched by tests/test_training.py as `python -m torch.distributed.run --nproc_per_node=2 tests/ddp_check.py OUT.json`.

On each CPU rank (gloo): the single-process loss and gradients of one global batch first (before joining the
process group), then the DDP loss and gradients from this rank's shard; writes the largest differences to OUT.json.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import features  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402

N_GLOBAL, N_VOXELS, SIZE = 13, 30, 64      # 13 rows: the ranks get 7 and 6 (uneven shards)
# float64 shows the algebra is exact; float32 shows the size of rounding differences
CASES = (("cl", False, torch.float64), ("reg", False, torch.float64), ("cl", True, torch.float32))


def make_model(method, dtype):
    torch.manual_seed(0)
    # no dropout: its masks differ between one process and two; nothing else may
    return models.build_model(method, N_VOXELS, "none", dropout=0.0).to(dtype).train()


def step(method, symmetric, dtype, model, images, fmri):
    x = features.prepare_images(images, "cpu").to(dtype)
    loss_back, loss_value = models.batch_loss(method, model, x, fmri.to(dtype), 0.3, symmetric)
    loss_back.backward()
    net = getattr(model, "module", model)
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers() if "running" in n}
    return float(loss_value), grads, buffers


def main(out_json):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_GLOBAL, 3, SIZE, SIZE), dtype=np.uint8)
    fmri = torch.from_numpy(rng.normal(size=(N_GLOBAL, N_VOXELS)).astype(np.float32))
    reference = {case: step(*case, make_model(case[0], case[2]), images, fmri) for case in CASES}  # not yet distributed

    runtime = training.setup_runtime("cpu")
    rows = np.array_split(np.arange(N_GLOBAL), runtime.world_size)[runtime.rank]
    report = {"world_size": runtime.world_size, "rows_per_rank": len(rows)}
    for case in CASES:
        # same seeded init on every rank, so DDP's initial 0.5 GB parameter broadcast is skipped
        ddp = DistributedDataParallel(make_model(case[0], case[2]), init_sync=False)
        loss, grads, buffers = step(*case, ddp, images[rows], fmri[rows])
        ref_loss, ref_grads, ref_buffers = reference[case]
        report[f"{case[0]}-symmetric={case[1]}-{str(case[2])[6:]}"] = {
            "loss": loss, "ref_loss": ref_loss, "loss_diff": abs(loss - ref_loss),
            "grad_max_abs_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
            "grad_max_abs": max(g.abs().max().item() for g in ref_grads.values()),
            "grad_max_rel_diff": max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp(min=1e-12)).item()
                                     for n in grads),
            "grad_max_rel_diff": max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item()
                                     for n in grads if ref_grads[n].abs().max() > 1e-3),
            "buffer_max_abs_diff": max([(buffers[n] - ref_buffers[n]).abs().max().item() for n in buffers] or [0.0]),
        }
    if runtime.is_main:
        Path(out_json).write_text(json.dumps(report, indent=1))
    runtime.close()


if __name__ == "__main__":
    main(sys.argv[1])
