"""Time feature extraction per backbone: images/s of one forward over its default layers, and peak memory.

Each backbone runs in a fresh child process (its own peak RSS; no thread pools of the last one left spinning),
random init, synthetic uint8 images normalised as the backbone's weights expect, float32 unless bf16=True.
Run alone: `python benchmark_backbones.py --names=alexnet,resnet18 --batch_size=32`; benchmark.py imports
benchmark_extraction().
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
names = ["alexnet", "resnet18", "resnet50", "vit_b_16", "convnext_tiny"]  # backbones (backbones.parse names)
image_size = 224                 # px
batch_size = 32                  # images per forward
batches = 3                      # timed forwards per backbone (after warmup)
warmup = 1                       # untimed forwards per backbone
threads = 0                      # torch threads in each child (0: torch's default)
device = "cpu"                   # cpu or cuda
bf16 = False                     # bfloat16 autocast (float32 otherwise)
channels_last = True             # as features.extract_features runs backbones
child = ""                       # internal: JSON of one measurement, run in a fresh process by the parent
# ---------------------------------------------------------------------
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_MARK = "@@RESULT@@"


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def measure(name: str, image_size: int = 224, batch_size: int = 32, batches: int = 3, warmup: int = 1,
            threads: int = 0, device: str = "cpu", bf16: bool = False, channels_last: bool = True,
            seed: int = 0) -> dict:
    """Images/s of the feature extractor of `name`'s default layers (random init) in this process, and memory."""
    import torch

    import backbones
    import runtime
    if threads:
        torch.set_num_threads(int(threads))
    dev = runtime.resolve_device(device)
    torch.manual_seed(seed)
    net = backbones.build(name, "none").to(dev).eval()
    pre = backbones.preprocessing(name, "none")
    if pre.fixed_size and image_size != pre.size:
        raise ValueError(f"{name} takes only {pre.size} px images, not {image_size}")
    layers = backbones.default_layers(net)
    extractor = backbones.feature_extractor(net, layers).eval()
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    mean = torch.tensor(pre.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=dev).view(1, 3, 1, 1)
    images = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (batch_size, 3, image_size, image_size),
                                                                     dtype=np.uint8))
    built_rss = peak_rss_gb()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    widths = {}
    with torch.inference_mode(), runtime.autocast_context(dev, bf16, cpu_bf16=bf16):
        for k in range(warmup + batches):
            if k == warmup:
                sync()
                t0 = time.perf_counter()
            x = (images.to(dev) / 255.0 - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = extractor(x)
            widths = {layer: feats[layer].flatten(1).float().cpu().numpy().shape[1] for layer in layers}
        sync()
        seconds = time.perf_counter() - t0
    return {"backbone": name, "images_per_s": batch_size * batches / seconds, "s_per_batch": seconds / batches,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "layers": len(layers),
            "features": int(sum(widths.values())), "widest_layer": int(max(widths.values())),
            "rss_built_gb": built_rss, "peak_rss_gb": peak_rss_gb(), "threads": torch.get_num_threads(),
            "precision": "bf16" if bf16 else "float32", "image_size": image_size, "batch_size": batch_size}


def benchmark_extraction(names=("alexnet", "resnet18", "resnet50", "vit_b_16", "convnext_tiny"),
                         image_size: int = 224, batch_size: int = 32, batches: int = 3, warmup: int = 1,
                         threads: int = 0, device: str = "cpu", bf16: bool = False,
                         channels_last: bool = True) -> list[dict]:
    """measure() of each backbone, each in a fresh `python benchmark_backbones.py --child=...` process."""
    rows = []
    for name in names:
        job = dict(name=name, image_size=image_size, batch_size=batch_size, batches=batches, warmup=warmup,
                   threads=threads, device=device, bf16=bf16, channels_last=channels_last)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--child={json.dumps(job)}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)][-1][len(_MARK):]))
        print(f"{name}: {rows[-1]['images_per_s']:.1f} images/s, peak RSS {rows[-1]['peak_rss_gb']:.2f} GB",
              flush=True)
    return rows


if __name__ == "__main__":
    import options
    import outputs
    config = options.apply_options(globals())
    if child:
        print(_MARK + json.dumps(measure(**json.loads(child))))
        sys.exit(0)
    results = benchmark_extraction(names, image_size, batch_size, batches, warmup, threads, device, bf16,
                                   channels_last)
    print(outputs.markdown_table(results, ["backbone", "images_per_s", "s_per_batch", "params_m", "layers",
                                           "features", "rss_built_gb", "peak_rss_gb", "threads"],
                                 float_format="{:.2f}"))
