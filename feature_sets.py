"""The vocabulary of feature sets: their names, labels and colours, and which are tuned, pooled or external.

A feature set is what an encoding model reads: the untuned backbone, a backbone fine-tuned per subject
(reg, cl), one fine-tuned on every subject's fMRI of an ROI (pooled-reg, pooled-cl), or features a user
computed elsewhere (external:<name>, read from features_dir).
"""
from __future__ import annotations

import options

METHODS = ("cl", "reg")                            # the two fine-tuning objectives: contrastive, regression
UNTUNED = "untuned"
PER_SUBJECT = ("reg", "cl")                        # tuned on one subject's fMRI of an ROI
POOLED = ("pooled-reg", "pooled-cl")               # tuned on every subject's fMRI of an ROI
TUNED = PER_SUBJECT + POOLED
BUILT_IN = (UNTUNED,) + TUNED
EXTERNAL_PREFIX = "external:"                      # external:<name>: features_dir/subjXX/<name>/*.npy

LABELS = {"untuned": "untuned", "reg": "reg-tuned", "cl": "CL-tuned", "pooled-reg": "pooled reg",
          "pooled-cl": "pooled CL"}
COLOURS = {"untuned": "#7f7f7f", "reg": "#1f77b4", "cl": "#d62728", "pooled-reg": "#6baed6",
           "pooled-cl": "#fc9272"}
_EXTERNAL_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def is_external(name: str) -> bool:
    return str(name).startswith(EXTERNAL_PREFIX)


def external_name(name: str) -> str:
    """'external:clip' -> 'clip' (the folder under features_dir/subjXX/)."""
    return str(name)[len(EXTERNAL_PREFIX):]


def is_tuned(name: str) -> bool:
    """Backed by fine-tuned checkpoints (per subject or pooled)."""
    return name in TUNED


def is_pooled(name: str) -> bool:
    return name in POOLED


def method_of(name: str) -> str:
    """The training objective of a tuned set: 'cl' or 'reg'."""
    if not is_tuned(name):
        raise options.OptionsError(f"feature set {name!r} is not tuned; tuned sets: {', '.join(TUNED)}")
    return name.split("-")[-1]


def pooled_set(method: str) -> str:
    """'cl' -> 'pooled-cl'."""
    return f"pooled-{method}"


def check(names) -> list[str]:
    """Validate feature-set names (built in, or external:<name>); one-line error listing the valid ones."""
    out = []
    for name in names:
        name = str(name).strip()
        if name not in BUILT_IN and not (is_external(name) and external_name(name)
                                         and "/" not in external_name(name)):
            raise options.OptionsError(f"unknown feature set {name!r}; expected one of {', '.join(BUILT_IN)} "
                                       "or external:<name> (a folder under features_dir/subjXX/)")
        out.append(name)
    return out


def label(name: str) -> str:
    return LABELS.get(name, f"{external_name(name)} (external)" if is_external(name) else name)


def colour(name: str) -> str:
    if name in COLOURS:
        return COLOURS[name]
    return _EXTERNAL_COLOURS[sum(map(ord, str(name))) % len(_EXTERNAL_COLOURS)]
