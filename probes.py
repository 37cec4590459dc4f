"""Classification linear probes: a dataset decoded once through a backbone's eval transform, LogisticRegression on
the features of each backbone (as the original for AlexNet: classifier.5, Resize 256 + CenterCrop 224, seeded 85/15
split; other backbones: their embedding node at their own input size)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

import options
import outputs

DATASETS = ("imagefolder", "caltech256", "places365", "sun397", "imagenet")


def open_dataset(dataset: str, root):
    """A torchvision dataset of PIL images read from root (never downloaded): ImageFolder or a named one."""
    import torchvision.datasets as tvd
    root = Path(root)
    if not root.exists():
        raise options.DataError(f"{root}: classification dataset folder not found")
    makers = {
        "imagefolder": lambda: tvd.ImageFolder(root),
        "caltech256": lambda: tvd.Caltech256(root, download=False),
        "places365": lambda: tvd.Places365(root, split="val", small=True, download=False),
        "sun397": lambda: tvd.SUN397(root, download=False),
        "imagenet": lambda: tvd.ImageNet(root, split="val"),
    }
    if dataset not in makers:
        raise options.OptionsError(f"--classification_dataset={dataset}: expected one of {', '.join(makers)}")
    try:
        return makers[dataset]()
    except (RuntimeError, FileNotFoundError) as err:
        raise options.DataError(f"{root}: cannot read {dataset} ({err})") from None


def dataset_labels(ds) -> np.ndarray:
    """Integer class label of every item, without decoding any image."""
    for attr in ("targets", "y", "_labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr))
    return np.asarray([ds.imgs[i][1] for i in range(len(ds))]) if hasattr(ds, "imgs") else None


def chosen_items(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Sorted item indices: every item (max_per_class 0), else up to max_per_class seeded items per class."""
    if max_per_class <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:max_per_class]
                                   for c in np.unique(labels)]))


def probe_layer(backbone: str) -> str:
    """The layer a probe reads by default: AlexNet's classifier.5 (fc7, the original's), else the embedding node."""
    import backbones
    name = backbones.parse(backbone).name
    return "classifier.5" if name == "alexnet" else backbones.default_layers(name)[-1]


def probe_input(backbone: str, weights) -> dict:
    """probe_image_cache's resize, crop and interpolation for a backbone: its weights' input size (crop) and filter,
    resized by 256/224 first as ImageNet evaluation does (AlexNet: Resize 256 bilinear + CenterCrop 224)."""
    import models
    pre = models.preprocessing_of(backbone, weights)
    return {"resize": round(pre.size * 256 / 224), "crop": pre.size, "interpolation": pre.interpolation}


def probe_image_cache(dataset: str, root, out_dir, max_per_class: int = 0, seed: int = 0, resize: int = 256,
                      crop: int = 224, interpolation: str = "bilinear"):
    """(uint8 N x 3 x crop x crop memmap, labels, class names): the chosen items through an eval transform
    (Resize(resize) + CenterCrop(crop); normalisation happens on the device), decoded once and cached."""
    import torchvision.transforms.v2 as T
    ds = open_dataset(dataset, root)
    labels = dataset_labels(ds)
    items = chosen_items(labels, max_per_class, seed)
    key = {"dataset": dataset, "root": str(Path(root).resolve()), "n_items": len(ds), "resize": resize,
           "crop": crop, "items": hashlib.sha1(items.tobytes()).hexdigest()}
    if interpolation != "bilinear":  # (keys of bilinear caches as before)
        key["interpolation"] = interpolation
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]
    path = Path(out_dir) / "image_cache" / f"probe_{dataset}_{digest}.npy"
    classes = list(getattr(ds, "classes", [str(c) for c in np.unique(labels)]))
    if path.is_file():
        return np.load(path, mmap_mode="r"), labels[items], classes
    transform = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode(interpolation), antialias=True),
                           T.CenterCrop(crop), T.PILToTensor()])
    with outputs.atomic_path(path, ".tmp.npy") as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), 3, crop, crop))
        for k, i in enumerate(tqdm(items, desc=f"decoding {dataset} images", unit="img")):
            pil, _ = ds[int(i)]
            cache[k] = transform(pil.convert("RGB")).numpy()
        cache.flush()
        del cache
    outputs.write_sidecar(path, key)
    return np.load(path, mmap_mode="r"), labels[items], classes


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.15,
                          seed: int = 0, max_iter: int = 5000) -> float:
    """Test accuracy of StandardScaler + LogisticRegression on a seeded stratified train/test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=test_fraction,
                                                        random_state=seed, stratify=labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))
