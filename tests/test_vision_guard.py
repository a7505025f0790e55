"""The guard on tiny, random timm ViTs and CNNs and an open_clip CLIP: images in, one verdict per image."""

import pytest
import torch
from PIL import Image

import sae_guard
from sae_guard import SAE, Concept, guard
from sae_guard.adapters.registry import adapter_for
from sae_guard.adapters.vision import UnnormalisedImageWarning, VisionAdapter, scope_mask
from sae_guard.hooks.capture import capture_hidden
from sae_guard.hooks.hookpoints import find_hookpoint

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")


def photo(red: bool, seed: int, size: int = 32) -> Image.Image:
    """A noisy image; `red` ones carry a large red square (the concept)."""
    g = torch.Generator().manual_seed(seed)
    background = torch.tensor([0, 1, 1]) * torch.rand(3, generator=g) * 200  # no red in the background
    pixels = (background + torch.rand(size, size, 3, generator=g) * 40).to(torch.uint8)
    if red:
        x, y = torch.randint(0, size // 2, (2,), generator=g).tolist()
        pixels[y : y + size // 2, x : x + size // 2] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


TARGET = [photo(True, s) for s in range(24)]
RETAIN = [photo(False, 100 + s) for s in range(24)]


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                             embed_dim=32, num_heads=2, num_classes=5).eval()


def cnn():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()


def clip():
    torch.manual_seed(0)
    return open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=3,
                                                               head_width=16),
                                text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)).eval()


def trained_sae(model, hookpoint, images, width):
    adapter = VisionAdapter(model)
    hidden = capture_hidden(find_hookpoint(model, hookpoint), *adapter.prepare(model, images).args)
    acts = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden
    sae = SAE.create("topk", d_in=width, d_sae=128, k=8)
    sae, _ = sae_guard.train(sae, acts.reshape(-1, width), tokens=60_000, batch_size=256, progress=False)
    sae.cfg.metadata["hookpoint"] = hookpoint
    return sae.eval()


@pytest.fixture(scope="module")
def vit_setup():
    model = vit()
    return model, trained_sae(model, "blocks.1", TARGET + RETAIN, 32)


def concept():
    return Concept("red", target=TARGET, retain=RETAIN, n_features=8, fpr=0.1)


def test_the_registry_picks_the_vision_family_for_timm_and_open_clip():
    assert isinstance(adapter_for(vit()), VisionAdapter)
    assert isinstance(adapter_for(cnn()), VisionAdapter)
    assert isinstance(adapter_for(clip()), VisionAdapter)
    assert VisionAdapter(vit()).default_hookpoint(vit()) == "blocks.2"
    assert VisionAdapter(clip()).default_hookpoint(clip()) == "visual.transformer.resblocks.2"


@pytest.mark.parametrize("scope", ["all", "patches", "cls"])
def test_vit_classifies_images_and_keeps_unflagged_outputs_bit_identical(vit_setup, scope):
    model, sae = vit_setup
    pixels = VisionAdapter(model).pixels([photo(True, 500), photo(False, 501)])
    with torch.no_grad():
        plain = model(pixels)
    fitted = concept()
    if scope == "cls":  # a random ViT's class token says little at layer 1: fit on patches, score the class token
        guard(model, sae=sae, concepts=[fitted], scope="patches").detach()
    g = guard(model, sae=sae, concepts=[fitted], scope=scope)
    try:
        verdicts = g.classify([photo(True, 500), photo(False, 501)])
        assert len(verdicts) == 2
        with torch.no_grad():
            guarded = model(pixels)
        live = g.last_verdicts
        assert [v.flagged for v in live] == [v.flagged for v in verdicts]
        for row, verdict in enumerate(live):
            if not verdict.flagged:
                assert torch.equal(guarded[row], plain[row])
    finally:
        g.detach()
    with torch.no_grad():
        assert torch.equal(model(pixels), plain)


def test_patch_scope_flags_red_images_more_than_plain_ones(vit_setup):
    model, sae = vit_setup
    g = guard(model, sae=sae, concepts=[concept()], scope="patches")
    try:
        red = [v.flagged for v in g.classify([photo(True, 900 + s) for s in range(12)])]
        plain = [v.flagged for v in g.classify([photo(False, 950 + s) for s in range(12)])]
        assert sum(red) > sum(plain)
    finally:
        g.detach()


def test_scope_masks_pick_class_or_patch_tokens():
    cls = scope_mask("cls", 5, 2, 7, torch.device("cpu"))
    patches = scope_mask("patches", 5, 2, 7, torch.device("cpu"))
    assert cls[0].tolist() == [True] + [False] * 6
    assert patches[0].tolist() == [False] * 5 + [True, True]


def test_cnn_feature_maps_and_only_all_scope():
    model = cnn()
    with pytest.raises(ValueError, match="CNN"):
        VisionAdapter(model, scope="patches")
    pixels = VisionAdapter(model).pixels([photo(False, 3, 64)])
    assert pixels.shape == (1, 3, *VisionAdapter(model).input_size[1:])  # resized by timm's own transform
    sae = trained_sae(model, "layer3", TARGET[:8] + RETAIN[:8], 256)
    g = guard(model, sae=sae, concepts=[concept()], hookpoint="layer3")
    try:
        assert len(g.classify(TARGET[:3])) == 3
    finally:
        g.detach()


def test_open_clip_encode_image_is_gated_and_scope_holds():
    model = clip()
    sae = trained_sae(model, "visual.transformer.resblocks.1", TARGET + RETAIN, 32)
    g = guard(model, sae=sae, concepts=[concept()], scope="patches")
    try:
        assert len(g.classify(TARGET[:4])) == 4
        pixels = VisionAdapter(model).pixels(TARGET[:2])
        with torch.no_grad():
            model.encode_image(pixels)
        assert len(g.last_verdicts) == 2
    finally:
        g.detach()


def test_bad_images_are_refused_and_the_model_left_alone(vit_setup):
    model, sae = vit_setup
    adapter = VisionAdapter(model)
    with pytest.raises(ValueError, match="reads"):
        adapter.pixels(torch.zeros(2, 3, 48, 48))
    with pytest.raises(ValueError, match="mixes image sizes"):
        adapter.pixels([torch.zeros(3, 32, 32), torch.zeros(3, 48, 48)])
    with pytest.raises(ValueError, match="channels"):
        adapter.pixels(torch.zeros(1, 4, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        adapter.pixels(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mode 'F'"):
        adapter.pixels([Image.new("F", (32, 32))])
    with pytest.raises(TypeError, match="PIL"):
        adapter.pixels(["a string"])
    with pytest.warns(UnnormalisedImageWarning):
        adapter.pixels(torch.rand(1, 3, 32, 32))
    gray = adapter.pixels([Image.new("L", (32, 32), 90)])
    assert gray.shape == (1, 3, 32, 32) and torch.equal(gray[0, 0], gray[0, 2])
    assert adapter.pixels(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    hooks = {(n, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}
    wrong = SAE.create("topk", d_in=48, d_sae=64, k=4)
    with pytest.raises(ValueError, match="d_in=48"):
        guard(model, sae=wrong, concepts=[concept()], hookpoint="blocks.1")
    with pytest.raises(ValueError, match="scope"):
        guard(model, sae=sae, concepts=[concept()], scope="everything")
    assert {(n, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks


# ---------------------------------------------------------------------- EfficientNet-Lite0 (real ImageNet weights)
SAMPLE_PHOTOS = {  # scikit-image's sample photos and words any sensible top-5 contains
    "chelsea": ("cat",),
    "coffee": ("espresso", "cup", "coffee mug"),
    "rocket": ("missile", "projectile", "space shuttle"),
}


@pytest.mark.slow
def test_efficientnet_lite0_classifies_sample_photos_sensibly(tmp_path, monkeypatch):
    skimage_data = pytest.importorskip("skimage.data")
    monkeypatch.setenv("SAE_GUARD_CACHE", str(tmp_path))
    from timm.data import ImageNetInfo

    from sae_guard.adapters.efficientnet import converted_weights, efficientnet_lite0

    model = efficientnet_lite0()
    assert converted_weights().parent == tmp_path / "efficientnet-lite0"
    adapter = VisionAdapter(model)
    info = ImageNetInfo()
    for name, words in SAMPLE_PHOTOS.items():
        pixels = adapter.pixels([Image.fromarray(getattr(skimage_data, name)())])
        with torch.no_grad():
            top5 = model(pixels).topk(5).indices[0].tolist()
        labels = [info.index_to_description(i).lower() for i in top5]
        assert any(w in label for w in words for label in labels), (name, labels)
    assert torch.equal(efficientnet_lite0().conv_stem.weight, model.conv_stem.weight)  # the cached file reloads


def test_efficientnet_conversion_refuses_a_state_dict_of_another_architecture(tmp_path, monkeypatch):
    from sae_guard.adapters import efficientnet

    monkeypatch.setenv("SAE_GUARD_CACHE", str(tmp_path))
    wrong = tmp_path / "wrong.pth"
    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    monkeypatch.setattr(efficientnet, "package_weights", lambda: wrong)
    with pytest.raises(ValueError, match="not the same architecture"):
        efficientnet.converted_weights()
    assert not (tmp_path / "efficientnet-lite0" / "model.safetensors").exists()
