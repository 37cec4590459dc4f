"""Backbones: names, building, weights from files, default layers, feature extraction, preprocessing, errors."""
from __future__ import annotations

import json
import sys
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

import backbones
import features
import options


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32))


def _hooked_outputs(net, layers, x) -> dict:
    """Each layer's activations by forward hooks on the module of that path: independent of fx tracing.

    A layer that is no module (a function node, e.g. CLIP's final projection) is left out."""
    outputs, handles = {}, []
    modules = dict(net.named_modules())
    for layer in (layer for layer in layers if layer in modules):
        def hook(module, args, out, layer=layer):
            outputs[layer] = (out[0] if isinstance(out, tuple) else out).clone()  # before any in-place op
        handles.append(net.get_submodule(layer).register_forward_hook(hook))
    with torch.no_grad():
        embedding = net(x)
    for handle in handles:
        handle.remove()
    return outputs, embedding


def _check_extraction(net, x, name: str, first: str, last_block: str) -> None:
    """Default layers run from the first block to the last, end at the embedding, and the extractor equals a
    hooked forward."""
    net.eval()
    layers = backbones.default_layers(net)
    nodes = backbones.valid_layers(net)
    positions = [max(i for i, node in enumerate(nodes) if node == layer or node.startswith(layer + "."))
                 for layer in layers]  # a module path names its last node
    assert positions == sorted(positions) and len(set(positions)) == len(layers), (name, layers)
    assert (layers[0], layers[-2]) == (first, last_block) and 3 <= len(layers) <= 8, (name, layers)
    assert layers == backbones.default_layers(name)  # by name: the same from a throwaway random init
    with torch.no_grad(), features.feature_extractor(net, layers) as extractor:
        feats = extractor(x)
    hooked, embedding = _hooked_outputs(net, layers, x)
    assert embedding.shape == (len(x), backbones.embed_dim(net)), name
    assert set(layers) - set(hooked) <= {layers[-1]}, name
    for layer in hooked:
        scale = float(hooked[layer].abs().max())
        assert feats[layer].shape == hooked[layer].shape, (name, layer)
        assert torch.allclose(feats[layer], hooked[layer], atol=1e-5 * scale, rtol=1e-5), (name, layer)
    assert torch.allclose(feats[layers[-1]], embedding, atol=1e-6), name


def _round_trip(name: str, tmp_path, full_state: dict | None = None) -> None:
    """A state dict saved from a random init (or the full classifier's) builds the same network."""
    torch.manual_seed(1)
    net = backbones.build(name, "none")
    path = tmp_path / f"{name.replace(':', '_').replace('/', '_')}.pth"
    torch.save(full_state if full_state is not None else net.state_dict(), path)
    torch.manual_seed(2)  # another random init underneath: every tensor must come from the file
    loaded = backbones.build(name, str(path))
    reference = full_state if full_state is not None else net.state_dict()
    for key, value in loaded.state_dict().items():
        source = reference[f"visual.{key}"] if f"visual.{key}" in reference else reference[key]  # CLIP: its tower
        assert torch.equal(value, source), (name, key)
    assert backbones.spec(loaded)["weights"] == f"file:{path.name}"


def test_parse_names():
    assert backbones.parse("alexnet") == backbones.Backbone("torchvision", "alexnet")
    assert backbones.parse("torchvision:resnet50").name == "resnet50"
    assert backbones.parse("tiny-vit") == backbones.Backbone("stand-in", "tiny-vit")
    assert set(torchvision.models.list_models(module=torchvision.models)) == set(backbones.torchvision_names())
    with pytest.raises(options.DataError, match="did you mean resnet18"):
        backbones.parse("resnet19")


def test_alexnet_is_the_paper_network():
    torch.manual_seed(0)
    net = backbones.build("alexnet", "none", dropout=0.3).eval()
    keys = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")]
    assert list(net.state_dict()) == keys + [f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")]
    assert backbones.default_layers("alexnet") == backbones.ALEXNET_LAYERS == backbones.default_layers(net)
    assert backbones.ALEXNET_LAYERS == ("features.2", "features.5", "features.7", "features.9", "features.12",
                                        "classifier.2", "classifier.5", "classifier.6")
    assert backbones.embed_dim(net) == 1000 and {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    x = _images(2, 64)
    with torch.no_grad(), features.feature_extractor(net, ["classifier.6", "features.2"]) as extractor:
        logits = net.classifier(torch.flatten(net.avgpool(net.features(x)), 1))  # the 1000 logits, by hand
        feats = extractor(x)
        assert logits.shape == (2, 1000) and torch.equal(net(x), logits)
        assert torch.equal(feats["classifier.6"], logits)
        assert torch.allclose(feats["features.2"], net.features[:3](x), atol=1e-6)


@pytest.mark.parametrize("name,size,first,last_block", [
    ("resnet18", 64, "layer1.0", "layer4.1"),
    ("tiny-vit", backbones.TINY_VIT_SIZE, "encoder.layers.encoder_layer_0", "encoder"),
    ("tiny", 32, "1", "4")])
def test_embedding_layers_and_extraction(name, size, first, last_block):
    torch.manual_seed(0)
    net = backbones.build(name, "none")
    _check_extraction(net, _images(3, size), name, first, last_block)


def test_embedding_is_the_pre_logit_features():
    torch.manual_seed(0)
    net = backbones.build("resnet18", "none").eval()
    torch.manual_seed(0)
    full = torchvision.models.resnet18(weights=None).eval()
    x = _images(2, 64)
    with torch.no_grad():
        pooled = torch.flatten(full.avgpool(full.layer4(full.layer3(full.layer2(full.layer1(
            full.maxpool(full.relu(full.bn1(full.conv1(x))))))))), 1)
        assert torch.allclose(net(x), pooled, atol=1e-6)
        assert torch.allclose(full.fc(net(x)), full(x), atol=1e-5)
    assert backbones.embed_dim(net) == 512 == full.fc.in_features
    assert backbones.spec(net) == {"name": "resnet18", "source": "torchvision", "weights": "none", "embed_dim": 512}


def test_local_weights_round_trip(tmp_path):
    _round_trip("tiny-vit", tmp_path)
    _round_trip("tiny", tmp_path)
    torch.manual_seed(3)  # the published format: the whole classifier, its last layer dropped on load
    _round_trip("resnet18", tmp_path, torchvision.models.resnet18(weights=None).state_dict())


def test_one_line_errors(tmp_path, monkeypatch):
    def one_line(call, *args, **kwargs) -> str:
        with pytest.raises(options.DataError) as err:
            call(*args, **kwargs)
        assert "\n" not in str(err.value)
        return str(err.value)

    net = backbones.build("tiny-vit", "none")
    message = one_line(backbones.check_layers, net, ["encoder.layers.encoder_layer_0", "encoder.layer_9"])
    assert "['encoder.layer_9']: not layers of tiny-vit" in message and "heads.head" in message
    assert "not found" in one_line(backbones.build, "resnet18", str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(2)}, tmp_path / "bad.pth")
    assert "bad.pth: not a resnet18 state dict" in one_line(backbones.build, "resnet18", str(tmp_path / "bad.pth"))
    torch.save(backbones.build("tiny", "none").state_dict(), tmp_path / "tiny.pth")
    assert "not a tiny-vit state dict" in one_line(backbones.build, "tiny-vit", str(tmp_path / "tiny.pth"))
    assert "IMAGENET1K_V2" in one_line(backbones.build, "resnet18", "IMAGENET1K_V2")  # resnet18 has only V1
    assert "no pretrained weights" in one_line(backbones.build, "tiny", "DEFAULT")
    assert one_line(backbones.check_same_backbone, "m/best.pt", {"name": "resnet18"}, "alexnet") == (
        "m/best.pt: trained with backbone resnet18, not alexnet")
    backbones.check_same_backbone("m/best.pt", None, "torchvision:alexnet")  # old checkpoints: AlexNet
    backbones.check_same_backbone("m/best.pt", {"name": "resnet18", "weights": "IMAGENET1K_V1"}, "resnet18")

    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    message = one_line(backbones.build, "resnet18")
    assert "--weights=none" in message and "resnet18-f37072fd.pth" in message and str(torch.hub.get_dir()) in message

    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    assert one_line(backbones.parse, "timm:resnet18") == (
        "backbone timm:resnet18 needs the optional package timm: pip install -r requirements-extras.txt")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    assert "optional package open_clip_torch" in one_line(backbones.build, "open_clip:RN50", "none")


def test_preprocessing_from_the_weights():
    imagenet = (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)
    assert backbones.preprocessing("alexnet") == backbones.Preprocessing(*imagenet, 224, "bilinear", False)
    assert backbones.preprocessing("efficientnet_b0").interpolation == "bicubic"  # torchvision's recipe for it
    assert backbones.preprocessing("vit_b_16", "IMAGENET1K_SWAG_E2E_V1").size == 384
    vit = backbones.preprocessing("vit_b_16", "none")
    assert (vit.size, vit.fixed_size) == (224, True)
    assert backbones.preprocessing("tiny-vit").size == backbones.TINY_VIT_SIZE


def test_timm_backbones(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = backbones.build("timm:test_vit", "none")
    pre = backbones.preprocessing("timm:test_vit")
    assert pre.fixed_size and pre.mean == (0.5, 0.5, 0.5)
    _check_extraction(net, _images(2, pre.size), "timm:test_vit", "patch_embed", "blocks.5")
    torch.manual_seed(0)
    net = backbones.build("timm:test_resnet", "none")
    _check_extraction(net, _images(2, 64), "timm:test_resnet", "conv1", "layer4.0")
    torch.manual_seed(4)  # the published format: with the classifier, dropped on load
    _round_trip("timm:test_resnet", tmp_path, timm.create_model("test_resnet").state_dict())
    with pytest.raises(options.DataError, match="not a timm model; did you mean"):
        backbones.parse("timm:resnet_18")

    import huggingface_hub.constants as hub  # offline, with an empty cache: fails at once, names the cache
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(options.DataError) as err:
        backbones.build("timm:test_resnet")
    assert str(tmp_path / "hub") in str(err.value) and "--weights=none" in str(err.value)


def test_open_clip_backbones(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    configs = {"test-ViT": {"embed_dim": 24, "text_cfg": text,
                            "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8}},
               "test-RN": {"embed_dim": 24, "text_cfg": text,
                           "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}}}
    ends = {"test-ViT": ("transformer.resblocks.0", "transformer.resblocks.2"), "test-RN": ("layer1.0", "layer4.0")}
    for arch, config in configs.items():
        (tmp_path / f"{arch}.json").write_text(json.dumps(config))
        open_clip.add_model_config(tmp_path / f"{arch}.json")
        torch.manual_seed(0)
        name = f"open_clip:{arch}"
        net = backbones.build(name, "none")
        assert backbones.embed_dim(net) == 24 and backbones.preprocessing(name).size == config["vision_cfg"]["image_size"]
        _check_extraction(net, _images(2, config["vision_cfg"]["image_size"]), name, *ends[arch])
    torch.manual_seed(5)  # a whole CLIP state dict: the image tower's part is taken
    _round_trip("open_clip:test-ViT", tmp_path, open_clip.create_model("test-ViT").state_dict())
    pre = backbones.preprocessing("open_clip:ViT-B-32/laion2b_s34b_b79k")  # from the tag's config: no download
    assert pre.mean == open_clip.OPENAI_DATASET_MEAN and pre.interpolation == "bicubic" and pre.size == 224
    with pytest.raises(options.DataError, match="its tags: openai"):
        backbones.parse("open_clip:RN50/nonsense")
