"""Launched by tests/test_models.py as `python -m torch.distributed.run --nproc_per_node=2 tests/ddp_check.py OUT.json`.

On each CPU rank (gloo): the single-process loss and gradients of one global batch first (before joining the
process group), then the DDP loss and gradients from this rank's shard; writes the differences to OUT.json.
The backbone is the small stand-in network: the algebra under test (gathered embeddings, BatchNorm statistics
over ranks, loss scaling) does not depend on AlexNet.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import models  # noqa: E402
from runtime import prepare_images, setup_runtime  # noqa: E402

N_GLOBAL, SIZE = 13, 32           # 13 rows: the ranks get 7 and 6 (uneven shards)
N_VOXELS = (30, 20)               # a pooled model's two subjects; per-subject models use the first
# (name, method, voxels per subject, source of the batch, symmetric loss, dtype): float64 shows the algebra is
# exact, float32 the size of rounding differences; "pooled" steps subject 2 of a two-subject model, so the
# other subject's projection gets no gradient (DDP with find_unused_parameters)
CASES = (("cl", "cl", N_VOXELS[:1], 0, False, torch.float64),
         ("reg", "reg", N_VOXELS[:1], 0, False, torch.float64),
         ("cl-pooled", "cl", N_VOXELS, 1, False, torch.float64),
         ("reg-pooled", "reg", N_VOXELS, 1, False, torch.float64),
         ("cl-symmetric", "cl", N_VOXELS[:1], 0, True, torch.float32),
         ("reg", "reg", N_VOXELS[:1], 0, False, torch.float32))


def make_model(method, voxels, dtype):
    torch.manual_seed(0)
    # no dropout: its masks differ between one process and two; nothing else may
    h_method = "subject" if len(voxels) == 1 else "average"
    return models.build_model(method, list(voxels), "none", 0.0, "tiny", h_method).to(dtype).train()


def step(method, source, symmetric, dtype, model, images, fmri):
    x = prepare_images(images, "cpu").to(dtype)
    loss_back, loss_value = models.batch_loss(method, model, x, fmri.to(dtype), 0.3, symmetric, source)
    loss_back.backward()
    net = getattr(model, "module", model)
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers() if "running" in n}
    return float(loss_value), grads, buffers


def compare(result, reference) -> dict:
    (loss, grads, buffers), (ref_loss, ref_grads, ref_buffers) = result, reference
    used = [n for n in ref_grads if ref_grads[n] is not None]
    total = torch.cat([ref_grads[n].flatten() for n in used]).norm()
    # tensors with a real gradient; the biases of the Linear layers before BatchNorm have none (BN removes the
    # mean): their rounding noise is bounded by grad_max_diff_over_total instead
    real = [n for n in used if ref_grads[n].norm() > 1e-6 * total]
    return {
        "loss": loss, "ref_loss": ref_loss, "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
        # per parameter tensor: |g - g_ref| / |g_ref| (Frobenius norms), the largest over tensors
        "grad_max_rel_diff": max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in real),
        "grad_max_diff_over_total": max(((grads[n] - ref_grads[n]).norm() / total).item() for n in used),
        "n_zero_gradient": len(used) - len(real),
        "grads_without_gradient_agree": all((grads[n] is None) == (ref_grads[n] is None) for n in ref_grads),
        "n_without_gradient": sum(g is None for g in ref_grads.values()),
        "buffer_max_rel_diff": max([((buffers[n] - ref_buffers[n]).norm() / ref_buffers[n].norm()).item()
                                    for n in buffers] or [0.0]),
    }


def main(out_json):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_GLOBAL, 3, SIZE, SIZE), dtype=np.uint8)
    fmri = [torch.from_numpy(rng.normal(size=(N_GLOBAL, v)).astype(np.float32)) for v in N_VOXELS]
    reference = {case: step(case[1], case[3], case[4], case[5], make_model(case[1], case[2], case[5]), images,
                            fmri[case[3]]) for case in CASES}  # one process, not yet distributed

    runtime = setup_runtime("cpu")
    rows = np.array_split(np.arange(N_GLOBAL), runtime.world_size)[runtime.rank]
    report = {"world_size": runtime.world_size, "rows_per_rank": len(rows)}
    for case in CASES:
        name, method, voxels, source, symmetric, dtype = case
        # same seeded init on every rank, so DDP's initial parameter broadcast can be skipped
        ddp = DistributedDataParallel(make_model(method, voxels, dtype), init_sync=False,
                                      find_unused_parameters=len(voxels) > 1)
        result = step(method, source, symmetric, dtype, ddp, images[rows], fmri[source][rows])
        report[f"{name}-{str(dtype)[6:]}"] = compare(result, reference[case])
        del ddp  # its reducer holds the process group: release it before the group is destroyed
    if runtime.is_main:
        Path(out_json).write_text(json.dumps(report, indent=1))
    runtime.close()


if __name__ == "__main__":
    main(sys.argv[1])
