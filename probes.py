"""Classification linear probes: images from an ImageFolder or a torchvision dataset, LogisticRegression on features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

import utils

def load_classification_images(dataset: str, root, image_size: int, max_per_class: int, seed: int = 0):
    """(uint8 N x 3 x S x S images, int labels, class names) from an ImageFolder or a torchvision dataset.

    dataset: 'imagefolder' (root = folder of class subfolders), or 'caltech256', 'places365', 'sun397',
    'imagenet' read from root with download=False (they must be present locally).
    """
    import torchvision.datasets as tvd
    root = Path(root)
    if not root.exists():
        raise utils.DataError(f"{root}: classification dataset folder not found")
    makers = {
        "imagefolder": lambda: tvd.ImageFolder(root),
        "caltech256": lambda: tvd.Caltech256(root, download=False),
        "places365": lambda: tvd.Places365(root, split="val", small=True, download=False),
        "sun397": lambda: tvd.SUN397(root, download=False),
        "imagenet": lambda: tvd.ImageNet(root, split="val"),
    }
    if dataset not in makers:
        raise utils.OptionsError(f"--classification_dataset={dataset}: expected one of {', '.join(makers)}")
    try:
        ds = makers[dataset]()
    except (RuntimeError, FileNotFoundError) as err:
        raise utils.DataError(f"{root}: cannot read {dataset} ({err})") from None
    targets = np.asarray(next(getattr(ds, a) for a in ("targets", "y", "_labels") if hasattr(ds, a)))
    rng = np.random.default_rng(seed)
    chosen = np.sort(np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:max_per_class]
                                     for c in np.unique(targets)]))
    images = np.empty((len(chosen), 3, image_size, image_size), dtype=np.uint8)
    for k, i in enumerate(tqdm(chosen, desc=f"decoding {dataset} images", unit="img")):
        pil, _ = ds[int(i)]
        images[k] = np.asarray(pil.convert("RGB").resize((image_size, image_size)), dtype=np.uint8).transpose(2, 0, 1)
    classes = list(getattr(ds, "classes", [str(c) for c in np.unique(targets)]))
    return images, targets[chosen], classes


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.15,
                          seed: int = 0) -> float:
    """Test accuracy of StandardScaler + LogisticRegression on a seeded stratified split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=test_fraction,
                                                        random_state=seed, stratify=labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))

