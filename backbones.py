"""Image backbones: which network a name means, how it is built and weighted, its layers, and how to feed it.

Names: torchvision classifiers ('alexnet', 'resnet18', ...), 'timm:<name>', 'open_clip:<arch>/<tag>', 'tiny', 'tiny-vit'.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import logging
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import options

ALEXNET_LAYERS = ("features.2", "features.5", "features.7", "features.9", "features.12",
                  "classifier.2", "classifier.5", "classifier.6")
STAND_INS = ("tiny", "tiny-vit")
N_DEFAULT_LAYERS = 8
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_VIT_SIZE = 32  # the tiny ViT's only input size (its position embeddings are for 4 x 4 patches of 8 px)
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_EXTRAS = "pip install -r requirements-extras.txt"


@dataclass(frozen=True)
class Backbone:
    """A parsed backbone name: where the network comes from, its model name and (open_clip) pretrained tag."""
    source: str          # torchvision, timm, open_clip or stand-in
    model: str           # torchvision/timm model name, open_clip architecture, or the stand-in's name
    tag: str | None = None  # open_clip pretrained tag ('openai', 'laion2b_s34b_b79k', ...); None elsewhere

    @property
    def name(self) -> str:
        """The canonical name, as parse() reads it back."""
        prefix = f"{self.source}:" if self.source in ("timm", "open_clip") else ""
        return prefix + self.model + (f"/{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class Preprocessing:
    """How images are fed to a backbone: normalisation, input size and the resize filter of its weights."""
    mean: tuple
    std: tuple
    size: int            # the input size the weights were trained/evaluated at (the crop size)
    interpolation: str   # resize filter: 'bilinear', 'bicubic', ...
    fixed_size: bool     # True: the network accepts only `size` (position embeddings of ViTs, CLIP's pooling)


def _optional(package: str, name: str):
    """Import an optional package or fail with the one line that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        pip_name = {"open_clip": "open_clip_torch"}.get(package, package.split(".")[0])
        raise options.DataError(f"backbone {name} needs the optional package {pip_name}: {_EXTRAS}") from None


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


@functools.lru_cache(maxsize=None)
def torchvision_names() -> tuple:
    import torchvision
    return tuple(torchvision.models.list_models(module=torchvision.models))


def parse(name: str) -> Backbone:
    """'resnet18' / 'timm:<name>' / 'open_clip:<arch>[/<tag>]' / 'tiny' / 'tiny-vit' -> Backbone, or a DataError."""
    text = str(name).strip()
    if text.startswith("timm:"):
        model = text[len("timm:"):]
        timm = _optional("timm", text)
        if not model or not timm.is_model(model.split(".")[0]):
            raise options.DataError(f"backbone {text!r}: {model!r} is not a timm model"
                                    + _did_you_mean(model, timm.list_models()))
        return Backbone("timm", model)
    if text.startswith("open_clip:"):
        arch, _, tag = text[len("open_clip:"):].partition("/")
        open_clip = _optional("open_clip", text)
        if arch not in open_clip.list_models():
            raise options.DataError(f"backbone {text!r}: {arch!r} is not an open_clip architecture"
                                    + _did_you_mean(arch, open_clip.list_models()))
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag and tag not in tags:
            raise options.DataError(f"backbone {text!r}: open_clip has no pretrained tag {tag!r} for {arch}; "
                                    f"its tags: {', '.join(tags) or 'none'}")
        return Backbone("open_clip", arch, tag or None)
    model = text[len("torchvision:"):] if text.startswith("torchvision:") else text
    if model in STAND_INS:
        return Backbone("stand-in", model)
    if model in torchvision_names():
        return Backbone("torchvision", model)
    raise options.DataError(f"unknown backbone {text!r}" + _did_you_mean(model, torchvision_names() + STAND_INS)
                            + "; expected a torchvision classification model (torchvision.models.list_models"
                            "(module=torchvision.models)), timm:<name>, open_clip:<arch>/<pretrained tag>, "
                            f"or a test stand-in ({', '.join(STAND_INS)})")


# ---- Building a backbone: the network whose forward gives the embedding the CL/reg heads attach to. ----

def set_dropout(net: nn.Module, p: float) -> nn.Module:
    """Set the probability of every nn.Dropout in net (AlexNet's classifier has two, p=0.5 by default)."""
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)
    return net


def weights_kind(weights) -> str:
    """'none' (random init), 'file' (a local state dict) or 'tag' ('DEFAULT' or a torchvision weights enum name)."""
    text = "" if weights is None else str(weights).strip()
    if text.lower() in ("none", ""):
        return "none"
    return "file" if text.lower().endswith(_WEIGHT_SUFFIXES) or "/" in text or Path(text).exists() else "tag"


def build(name: str, weights="DEFAULT", dropout: float | None = None) -> nn.Module:
    """The network whose forward is the embedding (AlexNet, tiny: the 1000 logits; others: the pooled pre-logit
    features or CLIP's image embedding), its spec kept as net.backbone_spec.

    weights: 'DEFAULT' / a torchvision weights name (cache or download), 'none' (random init: seed torch first) or
    a local state dict (the full classifier's / CLIP model's, or this backbone's). dropout: every nn.Dropout's p.
    """
    backbone = parse(name)
    kind = weights_kind(weights)
    builder = {"torchvision": _build_torchvision, "timm": _build_timm, "open_clip": _build_open_clip,
               "stand-in": _build_stand_in}[backbone.source]
    net, head_keys, embed_dim, weights_tag = builder(backbone, kind, weights)
    if kind == "file":
        _load_file(net, Path(weights), head_keys, backbone)
        weights_tag = f"file:{Path(weights).name}"
    if dropout is not None:
        set_dropout(net, dropout)
    net.backbone_spec = {"name": backbone.name, "source": backbone.source, "weights": weights_tag,
                         "embed_dim": int(embed_dim)}
    return net


def _replace_classifier(net: nn.Module) -> tuple[int, tuple]:
    """Replace a classifier's last layer (Linear, or SqueezeNet's 1x1 conv) by nn.Identity -> (embedding size,
    the removed layer's state-dict keys)."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not layers:
        layers = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    path, layer = layers[-1]
    parent_path, _, attr = path.rpartition(".")
    setattr(net.get_submodule(parent_path), attr, nn.Identity())
    dim = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    return dim, tuple(f"{path}.{k}" for k, _ in layer.named_parameters())


def _torchvision_weights(model: str, weights):
    """The torchvision weights enum a tag names ('DEFAULT' or e.g. 'IMAGENET1K_V2'), or a one-line DataError."""
    import torchvision
    choices = torchvision.models.get_model_weights(model)
    if str(weights) == "DEFAULT":
        return choices.DEFAULT
    if str(weights) not in choices.__members__:
        raise options.DataError(f"--weights={weights}: {model} has weights "
                                f"{', '.join(['DEFAULT'] + list(choices.__members__))}; or pass none or a local "
                                ".pth state dict")
    return choices[str(weights)]


def _build_torchvision(backbone: Backbone, kind: str, weights):
    import torchvision
    from urllib.error import URLError
    kwargs = {"aux_logits": False} if backbone.model in ("googlenet", "inception_v3") else {}
    enum = _torchvision_weights(backbone.model, weights) if kind == "tag" else None
    tag = enum.name if enum is not None else "none"
    if enum is None and kwargs:
        kwargs["init_weights"] = True  # their builders warn about the default without weights
    try:
        net = torchvision.models.get_model(backbone.model, weights=enum, **kwargs)
    except (URLError, OSError, RuntimeError, EOFError) as err:
        if enum is None:
            raise
        raise _fetch_error(f"{backbone.model} {tag}", err, f"torchvision caches them under "
                           f"{Path(torch.hub.get_dir()) / 'checkpoints'}: copy {enum.url.rsplit('/', 1)[-1]} there",
                           "file.pth") from None
    if backbone.model == "alexnet":  # the paper's embedding: the 1000 logits, state-dict keys unchanged
        return net, (), 1000, tag
    dim, head_keys = _replace_classifier(net)
    return net, head_keys, dim, tag


def _build_stand_in(backbone: Backbone, kind: str, weights):
    if kind == "tag":
        raise options.DataError(f"backbone {backbone.model!r} has no pretrained weights (got --weights={weights}); "
                                "use --weights=none or a local state-dict file")
    if backbone.model == "tiny":  # a small conv net with AlexNet's 1000-way output and a dropout layer
        return nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(4),
                             nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, 1000)), (), 1000, "none"
    from torchvision.models.vision_transformer import VisionTransformer  # at toy size: ViT code paths, fast
    net = VisionTransformer(TINY_VIT_SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    dim, head_keys = _replace_classifier(net)
    return net, head_keys, dim, "none"


def _build_timm(backbone: Backbone, kind: str, weights):
    timm = _optional("timm", backbone.name)
    if kind == "tag" and str(weights) != "DEFAULT":
        raise options.DataError(f"--weights={weights}: a timm model's pretrained tag goes in its name "
                                f"(timm:{backbone.model.split('.')[0]}.<tag>); weights are DEFAULT, none or a file")
    cfg = timm.models.get_pretrained_cfg(backbone.model)
    try:
        net = timm.create_model(backbone.model, pretrained=kind == "tag", num_classes=0)
    except Exception as err:  # noqa: BLE001 - hub, HTTP and file errors alike: say where the weights go
        if kind != "tag":
            raise
        hub = getattr(cfg, "hf_hub_id", None)
        where = _hub_cache(hub) if hub else f"{Path(torch.hub.get_dir()) / 'checkpoints'} ({getattr(cfg, 'url', '')})"
        raise _fetch_error(backbone.name, err, f"timm reads them from {where}: copy them there",
                           "file.safetensors or .pth") from None
    classifiers = cfg.classifier if cfg is not None and cfg.classifier else ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    dim = getattr(net, "head_hidden_size", None) or net.num_features
    tag = (getattr(cfg, "tag", None) or "DEFAULT") if kind == "tag" else "none"
    return net, classifiers, dim, tag


def _build_open_clip(backbone: Backbone, kind: str, weights):
    open_clip = _optional("open_clip", backbone.name)
    if kind == "tag" and (str(weights) != "DEFAULT" or not backbone.tag):
        tags = open_clip.list_pretrained_tags_by_model(backbone.model)
        raise options.DataError(f"--weights={weights} for {backbone.name}: open_clip's pretrained weights are named "
                                f"by a tag in the backbone name (open_clip:{backbone.model}/<tag>, tags: "
                                f"{', '.join(tags) or 'none'}) with --weights=DEFAULT; or pass none or a file")
    root_logger, level = logging.getLogger(), logging.getLogger().level
    if kind != "tag":  # open_clip warns of the random init asked for
        root_logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(backbone.model, pretrained=backbone.tag if kind == "tag" else None)
    except Exception as err:  # noqa: BLE001 - hub, HTTP and file errors alike: say where the weights go
        if kind != "tag":
            raise
        cfg = open_clip.get_pretrained_cfg(backbone.model, backbone.tag)
        where = (_hub_cache(cfg["hf_hub"].rstrip("/")) if cfg.get("hf_hub")
                 else f"{Path.home() / '.cache' / 'clip'} ({cfg.get('url', '')})")
        raise _fetch_error(backbone.name, err, f"open_clip reads them from {where}: copy them there",
                           "file (CLIP's or its image tower's)") from None
    finally:
        root_logger.setLevel(level)
    net = model.visual
    dim = getattr(net, "output_dim", None) or open_clip.get_model_config(backbone.model)["embed_dim"]
    return net, (), int(dim), backbone.tag if kind == "tag" else "none"


def _hub_cache(repository: str) -> str:
    from huggingface_hub import constants
    return (f"the Hugging Face hub cache {constants.HF_HUB_CACHE} (repository {repository}; HF_HUB_OFFLINE=1 "
            "reads only the cache)")


def _fetch_error(label: str, err: Exception, where: str, file_hint: str) -> options.DataError:
    return options.DataError(f"{label} weights could not be fetched ({type(err).__name__}: {_first_line(err)}); "
                             f"{where}, or pass --weights=/path/to/{file_hint} (a local state dict), or "
                             "--weights=none for a random init")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        safetensors = _optional("safetensors.torch", f"weights {path.name}")
        return safetensors.load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def _load_file(net: nn.Module, path: Path, head_keys, backbone: Backbone) -> None:
    """Load a local state dict: this backbone's own, or the full classifier / CLIP model's (head or text dropped)."""
    if not path.is_file():
        raise options.DataError(f"{path}: weights file not found; expected DEFAULT, a weights name, none or a local "
                                f"state dict of {backbone.name}")
    try:
        state = _read_state_dict(path)
        if not isinstance(state, dict):
            raise TypeError(f"found {type(state).__name__}, not a dict of tensors")
        if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
            state = {k[len("module."):]: v for k, v in state.items()}
        if backbone.source == "open_clip" and any(k.startswith("visual.") for k in state):
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        prefixes = tuple(f"{k}." for k in head_keys)
        state = {k: v for k, v in state.items() if not (k in head_keys or k.startswith(prefixes))}
        net.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError, OSError, AttributeError) as err:
        raise options.DataError(f"{path}: not a {backbone.name} state dict ({type(err).__name__}: "
                                f"{_first_line(err)})") from None


# ---- What was built: the spec kept in checkpoints, and the check that a checkpoint fits. ----

def spec(net: nn.Module) -> dict:
    """{name, source, weights, embed_dim} of a network made by build(): plain types, for checkpoints."""
    net = getattr(net, "module", net)  # DDP
    if not isinstance(getattr(net, "backbone_spec", None), dict):
        raise ValueError(f"{type(net).__name__} was not made by backbones.build (no backbone_spec)")
    return dict(net.backbone_spec)


def embed_dim(net: nn.Module) -> int:
    """Size of the embedding the network's forward returns (what the CL/reg heads attach to)."""
    return int(spec(net)["embed_dim"])


def check_same_backbone(path, recorded, expected: str) -> None:
    """Refuse a checkpoint trained with another backbone; recorded: its spec dict, name, or None (AlexNet)."""
    found = parse((recorded.get("name") if isinstance(recorded, dict) else recorded) or "alexnet").name
    if found != parse(expected).name:  # (checkpoints from before backbones were recorded are AlexNet's)
        raise options.DataError(f"{path}: trained with backbone {found}, not {parse(expected).name}")


# ---- Layers: feature_extraction node names and the default ~8 per network (the extractor: features.py). ----

def tracer_kwargs(net: nn.Module) -> dict:
    """timm marks modules and functions that fx must not trace into (its own extractor does the same); open_clip
    towers may hold timm models."""
    if any(type(m).__module__.startswith("timm.") for m in net.modules()):
        import timm.layers
        return {"leaf_modules": list(timm.layers.get_notrace_modules()),
                "autowrap_functions": list(timm.layers.get_notrace_functions())}
    return {}


def _trace(net: nn.Module) -> tuple[list, str, list, int]:
    """(eval-mode node names in execution order, the name of the node the forward returns, the positions of the
    nodes every input -> output path passes through (where the network can be cut), where the embedding is made)."""
    from torchvision.models import feature_extraction as fx
    tracer = fx.NodePathTracer(**fx._set_default_tracer_kwargs(tracer_kwargs(net)))
    was_training = net.training
    try:
        graph = tracer.trace(net.eval())
    except Exception as err:  # noqa: BLE001 - data-dependent control flow and the like: say which network
        raise options.DataError(f"backbone {_label(net)}: torch.fx cannot trace it into layers "
                                f"({type(err).__name__}: {_first_line(err)})") from None
    finally:
        net.train(was_training)
    nodes = [n for n in graph.nodes if n in tracer.node_to_qualname]
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    output = output if output in tracer.node_to_qualname else nodes[-1]
    position = {n: i for i, n in enumerate(nodes)}
    reached, needed = {nodes[0]}, {output}  # from the input; towards the output
    for n in nodes:
        reached.update(u for u in n.users if n in reached and u in position)
    for n in reversed(nodes):
        needed.update(a for a in n.all_input_nodes if n in needed and a in position)
    on_path = reached & needed
    jumped = np.zeros(len(nodes) + 1, dtype=np.int64)  # in topological order a node is a cut iff no edge jumps it
    for a, b in ((a, b) for a in on_path for b in a.users if b in on_path and position[b] > position[a] + 1):
        jumped[position[a] + 1] += 1
        jumped[position[b]] -= 1
    cuts = [i for i in np.flatnonzero(np.cumsum(jumped)[:len(nodes)] == 0)
            if nodes[i] in on_path and not any(_overwrites(net, u, nodes[i]) for u in nodes[i].users)]
    end = output  # the embedding's value is made before any trailing identity, dropout or flatten
    while end.all_input_nodes and (end.target is torch.flatten or end.op == "call_module" and isinstance(
            net.get_submodule(end.target), (nn.Identity, nn.Dropout, nn.Flatten))):
        end = end.all_input_nodes[0]
    names = [tracer.node_to_qualname[n] for n in nodes]
    return names, tracer.node_to_qualname[output], cuts, position.get(end, position[output])


def _overwrites(net: nn.Module, user, node) -> bool:
    """Whether `user` changes `node`'s tensor in place (ReLU(inplace=True), x += y): its value is gone after."""
    module = net.get_submodule(user.target) if user.op == "call_module" else None
    in_place = getattr(module, "inplace", False) or user.kwargs.get("inplace", False) or user.target in (
        operator.iadd, operator.imul)
    return bool(in_place) and user.args[:1] == (node,)


def _label(net: nn.Module) -> str:
    return getattr(net, "backbone_spec", {}).get("name", type(net).__name__)


def valid_layers(net: nn.Module) -> list:
    """Every layer name of the network (feature_extraction node names; a module path names its last node)."""
    return _trace(net)[0]


def _last_nodes(names) -> dict:
    """{module path or node name: position of the node it returns}: a module path returns its last node."""
    last = {}
    for i, name in enumerate(names):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            last[".".join(parts[:k])] = i
    return last


def default_layers(backbone, n: int = N_DEFAULT_LAYERS) -> tuple:
    """~n layer names spanning a network's depth (of a name or a network): AlexNet's are the paper's 8; others'
    are n - 1 evenly spaced block outputs where the network can be cut, then the node that is the embedding."""
    if isinstance(backbone, str):
        return _default_layers_of_name(parse(backbone).name, n)
    names, embedding, cuts, end = _trace(backbone)
    if _label(backbone) == "alexnet" or (_label(backbone) == "AlexNet" and names[-1] == "classifier.6"):
        return ALEXNET_LAYERS
    last = _last_nodes(names)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    blocks = {}  # cut position -> the innermost non-leaf module ending there, a container only if no other
    for path, module in sorted(backbone.named_modules(), key=lambda item: item[0].count(".")):
        if path and list(module.children()) and last.get(path) in cuts:
            held = blocks.get(last[path])
            if held is None or isinstance(held[1], containers) or not isinstance(module, containers):
                blocks[last[path]] = (path, module)
    candidates = {pos: path for pos, (path, _) in blocks.items() if pos < end}
    whole = {pos: path for pos, (path, module) in blocks.items() if pos < end and not isinstance(module, containers)}
    if len(whole) >= min(n - 1, len(candidates)):  # enough whole blocks: not the insides of a block
        candidates = whole
    if len(candidates) < 2:  # a flat network (a Sequential of layers): its cuts, else all of its nodes
        cut_names = {pos: names[pos] for pos in cuts if 0 < pos < end}
        candidates = cut_names if len(cut_names) >= 2 else dict(enumerate(names[1:end], start=1))
    ordered = [candidates[pos] for pos in sorted(candidates)]
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, min(n - 1, len(ordered)))).astype(int))
    return tuple(ordered[i] for i in picks) + (embedding,)


@functools.lru_cache(maxsize=None)
def _default_layers_of_name(name: str, n: int) -> tuple:
    if name == "alexnet":
        return ALEXNET_LAYERS
    with torch.random.fork_rng(devices=[]):  # a throwaway random init must not move the caller's seed
        try:  # tracing needs no values: parameters on the meta device cost no memory or init time
            with torch.device("meta"):
                net = build(name, "none")
        except (NotImplementedError, RuntimeError):
            net = build(name, "none")
        return default_layers(net, n)


def check_layers(net: nn.Module, layers) -> list:
    """The layers, or a one-line DataError naming the wrong ones and the network's valid choices."""
    layers = [str(layer) for layer in layers]
    names = valid_layers(net)
    last = _last_nodes(names)
    wrong = [layer for layer in layers if layer not in last]
    if not layers or wrong:
        shown = names if len(names) <= 40 else names[:20] + ["..."] + names[-20:]
        raise options.DataError(
            f"layers {wrong or layers}: " + ("not layers of" if wrong else "no layers given for")
            + f" {_label(net)}; its defaults are {', '.join(default_layers(net))}; a layer is a torchvision feature_"
            f"extraction node name or a module path (its last node); its {len(names)} nodes: {', '.join(shown)}")
    return layers


# ---- Preprocessing: the weights' own normalisation, input size and resize filter. ----

def preprocessing(name: str, weights="DEFAULT") -> Preprocessing:
    """Normalisation, input size and resize filter from the weights' own transforms (no download needed)."""
    backbone = parse(name)
    kind = weights_kind(weights)
    if backbone.source == "stand-in":
        vit = backbone.model == "tiny-vit"
        return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, TINY_VIT_SIZE if vit else 64, "bilinear", vit)
    if backbone.source == "torchvision":
        enum = _torchvision_weights(backbone.model, weights if kind == "tag" else "DEFAULT")
        t = enum.transforms()
        fixed = backbone.model.startswith(("vit_", "maxvit"))
        # a random-init or local-file ViT is built at torchvision's default 224 px, whatever the weights' size
        size = 224 if fixed and kind != "tag" else int(t.crop_size[0])
        return Preprocessing(tuple(t.mean), tuple(t.std), size, t.interpolation.value, fixed)
    if backbone.source == "timm":
        timm = _optional("timm", backbone.name)
        cfg = timm.models.get_pretrained_cfg(backbone.model)
        data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
        return Preprocessing(tuple(data["mean"]), tuple(data["std"]), int(data["input_size"][-1]),
                             str(data["interpolation"]), bool(cfg.fixed_input_size) if cfg else False)
    open_clip = _optional("open_clip", backbone.name)
    cfg = open_clip.get_pretrained_cfg(backbone.model, backbone.tag) if backbone.tag else {}
    size = open_clip.get_model_config(backbone.model)["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    return Preprocessing(tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                         tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)), int(size),
                         cfg.get("interpolation", "bicubic"), True)
