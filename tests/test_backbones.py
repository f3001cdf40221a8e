"""Backbone registry, timm models built for --input-size, and DinoBloom checkpoints in the published layout.

DinoBloom files are written here with random tensors under exactly the keys and shapes the authors
publish (Zenodo record 10908163): ``{"teacher": {"backbone.<DINOv2 key>", "dino_head.*", "ibot_head.*"}}``,
with DINOv2's own key names generated from the architecture (not from timm), so the tests check the
mapping onto timm rather than repeat it. Files of the large variants hold broadcast zero tensors:
torch.save stores one element for them, so a file with every ViT-B key and shape stays tiny.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from milhema.bags import read_bag
from milhema.cli import main
from milhema.config import DEFAULTS
from milhema.data import load_cohort
from milhema.embed import backbone as backbone_module
from milhema.embed.backbone import (
    Backbone,
    ChecksumWarning,
    RandomWeightsWarning,
    file_sha256,
    find_misfit,
    list_backbones,
    load_backbone,
    register_backbone,
)
from milhema.embed.dinobloom import VARIANTS, published_state
from milhema.embed.pipeline import EmbedOptions, embed_cohort
from milhema.embed.timm_backbone import dinov2_to_timm
from milhema.errors import EmbedError
from milhema.slides.crops import read_crop

CLASSES = DEFAULTS["data"]["classes"]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# DINOv2 architectures as facebookresearch/dinov2 defines them: width, depth, SwiGLU feed-forward (ViT-G).
DINOV2 = {"s": (384, 12, False), "b": (768, 12, False), "l": (1024, 24, False), "g": (1536, 40, True)}


def dinov2_shapes(letter: str, chunks: int = 0) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a DINOv2 ViT/14 backbone at 224 px in DINOv2's own names (chunked when ``chunks``)."""
    dim, depth, swiglu = DINOV2[letter]
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, dim), "pos_embed": (1, 257, dim), "mask_token": (1, dim),
                                          "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,)}
    # SwiGLUFFNFused: hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8, packed gate + value in w12.
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    for i in range(depth):
        b = f"blocks.{i // (depth // chunks)}.{i}." if chunks else f"blocks.{i}."
        shapes |= {b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                   b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                   b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "ls2.gamma": (dim,)}
        if swiglu:
            shapes |= {b + "mlp.w12.weight": (2 * hidden, dim), b + "mlp.w12.bias": (2 * hidden,),
                       b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)}
        else:
            shapes |= {b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)}
    return shapes | {"norm.weight": (dim,), "norm.bias": (dim,)}


def published_teacher(letter: str, make: Callable[[str, tuple[int, ...]], torch.Tensor],
                      chunks: int = 0) -> dict[str, torch.Tensor]:
    """The ``teacher`` dict of a DinoBloom file: ``backbone.*`` plus DINO and iBOT heads."""
    dim = DINOV2[letter][0]
    teacher = {f"backbone.{k}": make(k, shape) for k, shape in dinov2_shapes(letter, chunks).items()}
    for head in ("dino_head", "ibot_head"):  # a projection MLP and a weight-normed prototype layer
        teacher |= {f"{head}.mlp.0.weight": make("w", (64, dim)), f"{head}.mlp.0.bias": make("b", (64,)),
                    f"{head}.last_layer.weight_g": make("g", (256, 1)), f"{head}.last_layer.weight_v": make("w", (256, 64))}
    return teacher


def random_tensor(generator: torch.Generator) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """Trained-looking scales: norms near 1, layer scales 0.1, other weights small."""
    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            return 1 + 0.1 * torch.randn(shape, generator=generator)
        if key.endswith("gamma"):
            return torch.full(shape, 0.1)
        return 0.05 * torch.randn(shape, generator=generator)
    return make


def broadcast_zeros(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(1).expand(shape)


@pytest.fixture(scope="module")
def dinobloom_s(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random DinoBloom-S.pth in the published layout, and its teacher dict."""
    teacher = published_teacher("s", random_tensor(torch.Generator().manual_seed(5)))
    path = tmp_path_factory.mktemp("dinobloom") / "DinoBloom-S.pth"
    torch.save({"teacher": teacher}, path)
    return path, teacher


@pytest.fixture(scope="module")
def dinobloom_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dinobloom") / "DinoBloom-B.pth"
    torch.save({"teacher": published_teacher("b", broadcast_zeros)}, path)
    return path


def by_hand(teacher: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's DINOv2 ViT-S at 224 px with the teacher's backbone loaded as a user would (S needs no renaming)."""
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    vit.load_state_dict({k.removeprefix("backbone."): v for k, v in teacher.items()
                         if k.startswith("backbone.") and k != "backbone.mask_token"}, strict=True)
    return vit.eval()


def test_dinobloom_s_embeds_a_cohort_as_the_timm_vit_loaded_by_hand(dinobloom_s, tiny_cohort: Path,
                                                                     tmp_path: Path) -> None:
    weights, teacher = dinobloom_s
    cohort = load_cohort(tiny_cohort, CLASSES)
    # One slide in 13 (the first, 11 cells): ViT-S at 224 px runs at a few cells/s on two cores.
    opts = EmbedOptions(backbone="dinobloom-s", weights=weights, workers=0, progress=False, batch_size=16,
                        shard=(0, 13))
    with pytest.warns(ChecksumWarning, match="differs from the published DinoBloom-S.pth"):
        report = embed_cohort(cohort, tmp_path, opts)
    assert report.written and report.cells > 0
    vit = by_hand(teacher)
    for slide_id in report.written:
        bag = read_bag(tmp_path / f"{slide_id}.h5")
        source = next(s.source for s in cohort.slides if s.slide_id == slide_id)
        crops = [np.asarray(Image.fromarray(read_crop(source / c)).resize((224, 224), Image.Resampling.BICUBIC))
                 for c in bag.cell_ids]
        x = torch.from_numpy(((np.stack(crops) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32))
        with torch.inference_mode():
            expected = vit(x.permute(0, 3, 1, 2)).numpy()
        assert bag.features.shape == (len(crops), 384) and expected.std() > 0.1
        np.testing.assert_allclose(bag.features.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
        assert bag.backbone == "dinobloom-s" and bag.attrs["weights_sha256"] == file_sha256(weights)
        assert bag.attrs["input_size"] == 224 and bag.attrs["backbone_output"] == "class token"
        assert bag.attrs["feature_blocks"] == "dinobloom-s:384"


def test_dinobloom_class_and_mean_patch_token(dinobloom_s) -> None:
    weights, teacher = dinobloom_s
    with pytest.warns(ChecksumWarning):
        both = load_backbone("dinobloom-s+mean", weights)
    vit = by_hand(teacher)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = vit.forward_features(x)
        out = both.model(x)
    assert both.feature_dim == 768 and both.output == "class token + mean patch token"
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1), rtol=1e-4, atol=1e-4)


def _refused(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run the CLI; assert exit status 2 and one line without traceback; return that line."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("milhema: warning:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _embed(cohort: Path, out: Path, *args: str) -> list[str]:
    return ["embed", "--cohort", str(cohort), "--out", str(out), "--workers", "0", "-q", *args]


def test_wrong_variant_or_layout_is_refused_in_one_line(dinobloom_s, dinobloom_b: Path, tiny_cohort: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bags"
    err = _refused(capsys, _embed(tiny_cohort, out, "--backbone", "dinobloom-s", "--weights", str(dinobloom_b)))
    assert err == ("milhema: error: weights DinoBloom-B.pth do not fit backbone dinobloom-s: cls_token: the file has "
                   "[1, 1, 768], the model expects [1, 1, 384] (and 173 more tensors differ); this looks like a "
                   "DinoBloom checkpoint (768 features, as DinoBloom-B.pth): use --backbone dinobloom-b")
    # The published file given to a timm name gets the DinoBloom name as a hint.
    err = _refused(capsys, _embed(tiny_cohort, out, "--backbone", "timm/vit_small_patch14_dinov2",
                                  "--weights", str(dinobloom_s[0])))
    assert "weights DinoBloom-S.pth: expected a mapping of tensor names to tensors" in err
    assert err.endswith("use --backbone dinobloom-s")
    # A plain timm state dict is another layout for DinoBloom.
    plain = tmp_path / "resnet.safetensors"
    from safetensors.torch import save_file
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(plain))
    err = _refused(capsys, _embed(tiny_cohort, out, "--backbone", "dinobloom-s", "--weights", str(plain)))
    assert err == ("milhema: error: weights resnet.safetensors: not a DinoBloom checkpoint: expected {'teacher': "
                   "{'backbone.…': tensor}} as published in Zenodo record 10908163, found 'conv1.weight'")
    # A DinoBloom file made for another input size (here 518 px, 1370 tokens).
    teacher = published_teacher("s", broadcast_zeros)
    teacher["backbone.pos_embed"] = torch.zeros(1).expand(1, 1370, 384)
    torch.save({"teacher": teacher}, tmp_path / "DinoBloom-518.pth")
    err = _refused(capsys, _embed(tiny_cohort, out, "--backbone", "dinobloom-s", "--weights",
                                  str(tmp_path / "DinoBloom-518.pth")))
    assert "pos_embed: the file has [1, 1370, 384], the model expects [1, 257, 384]; the file is for 518 px" in err
    err = _refused(capsys, _embed(tiny_cohort, out, "--backbone", "dinobloom-s", "--input-size", "128",
                                  "--no-pretrained"))
    assert err.endswith("backbone dinobloom-s takes 224 px cells (its position embeddings are for 224 px); "
                        "leave out --input-size")
    assert not list(out.glob("*.h5"))


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_pickle_of_arbitrary_objects_is_refused_and_never_run(tiny_cohort: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "DinoBloom-S.pth"
    torch.save({"teacher": {"backbone.cls_token": _Payload(marker)}}, evil)
    torch.load(evil, weights_only=False)  # positive control: loading it unsafely runs the payload
    assert marker.exists()
    marker.unlink()
    err = _refused(capsys, _embed(tiny_cohort, tmp_path / "bags", "--backbone", "dinobloom-s", "--weights", str(evil)))
    assert err.startswith("milhema: error: weights DinoBloom-S.pth: refused, not a plain tensor state dict")
    assert not marker.exists()


def test_dinobloom_g_keys_map_onto_timm_vit_giant() -> None:
    """ViT-G uses SwiGLU (w12/w3) and here chunked blocks; compared by shape on the meta device (nothing allocated)."""
    with torch.device("meta"):
        giant = timm.create_model(VARIANTS["g"].arch, pretrained=False, num_classes=0, img_size=224)
        teacher = published_teacher("g", lambda key, shape: torch.empty(shape), chunks=4)
    assert "backbone.blocks.3.39.mlp.w12.weight" in teacher
    state = published_state({"teacher": teacher}, Path("DinoBloom-G.pth"), "dinobloom-g")
    assert find_misfit(giant.state_dict(), state, strict=True) is None
    assert "blocks.39.mlp.fc1.weight" in state and "mask_token" not in state
    assert not any(k.startswith(("dino_head", "ibot_head")) for k in state)
    for letter in "bl":  # the other published sizes too
        with torch.device("meta"):
            vit = timm.create_model(VARIANTS[letter].arch, pretrained=False, num_classes=0, img_size=224)
            state = dinov2_to_timm({k: torch.empty(s) for k, s in dinov2_shapes(letter).items()})
        assert find_misfit(vit.state_dict(), state, strict=True) is None


def test_dinov2_swiglu_becomes_timm_swiglu_packed() -> None:
    """DINOv2's SwiGLU computes w3(silu(x W12[:h]) * x W12[h:]); timm's packed layer must compute the same."""
    from timm.layers import SwiGLUPacked

    g = torch.Generator().manual_seed(0)
    dim, hidden = 16, 24
    w12, b12 = torch.randn(2 * hidden, dim, generator=g), torch.randn(2 * hidden, generator=g)
    w3, b3 = torch.randn(dim, hidden, generator=g), torch.randn(dim, generator=g)
    x = torch.randn(5, dim, generator=g)
    x1, x2 = (x @ w12.T + b12).chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(x1) * x2) @ w3.T + b3
    mlp = SwiGLUPacked(in_features=dim, hidden_features=2 * hidden)
    state = dinov2_to_timm({"blocks.0.mlp.w12.weight": w12, "blocks.0.mlp.w12.bias": b12,
                            "blocks.0.mlp.w3.weight": w3, "blocks.0.mlp.w3.bias": b3})
    mlp.load_state_dict({k.removeprefix("blocks.0.mlp."): v for k, v in state.items()}, strict=True)
    torch.testing.assert_close(mlp(x), expected)


def test_timm_vit_is_built_for_the_input_size_and_loads_a_224_px_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.warns(RandomWeightsWarning):
        reference = load_backbone("timm/vit_small_patch14_dinov2", pretrained=False, input_size=224)
    assert reference.input_size == 224 and reference.feature_dim == 384
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, str(tmp_path / "vits224.safetensors"))
    loaded = load_backbone("timm/vit_small_patch14_dinov2", tmp_path / "vits224.safetensors", input_size=224)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), reference.model(x))
    # Without --input-size the model is built for timm's default 518 px: the message says which size fits.
    with pytest.raises(EmbedError) as err:
        load_backbone("timm/vit_small_patch14_dinov2", tmp_path / "vits224.safetensors")
    assert str(err.value) == ("weights vits224.safetensors do not fit backbone timm/vit_small_patch14_dinov2: pos_embed: "
                              "the file has [1, 257, 384], the model expects [1, 1370, 384]; the file is for 224 px "
                              "input: use --input-size 224")
    # Meta's own DINOv2 layout (mask_token, DINOv2 key names) loads under the timm name too.
    flat = {k: random_tensor(torch.Generator().manual_seed(2))(k, shape) for k, shape in dinov2_shapes("s").items()}
    torch.save(flat, tmp_path / "dinov2_vits14.pth")
    meta_layout = load_backbone("timm/vit_small_patch14_dinov2", tmp_path / "dinov2_vits14.pth", input_size=224)
    with torch.inference_mode():
        torch.testing.assert_close(meta_layout.model(x), by_hand({f"backbone.{k}": v for k, v in flat.items()})(x))
    # CNNs take any input size without being rebuilt.
    with pytest.warns(RandomWeightsWarning):
        assert load_backbone("timm/resnet18", pretrained=False, input_size=96).input_size == 96


def test_registry_names_suggestions_and_a_new_family(monkeypatch: pytest.MonkeyPatch) -> None:
    listed = list_backbones()
    assert {"dinobloom-s", "dinobloom-g+mean", "none", "timm/<model>"} <= set(listed)
    for typo, hint in (("dinobloom_s", "dinobloom-s"), ("DinoBloom-S", "dinobloom-s"), ("resnet18", "timm/resnet18"),
                       ("none ", "none")):
        with pytest.raises(EmbedError, match=f"unknown backbone .*did you mean '{hint}'"):
            load_backbone(typo, pretrained=False)
    with pytest.raises(EmbedError, match="has no image model"):
        load_backbone("none", pretrained=False)

    monkeypatch.setattr(backbone_module, "_FAMILIES", list(backbone_module._FAMILIES))

    @register_backbone("tiny-a", "tiny-b", summary="two 1x1 convolutions")
    def load_tiny(name: str, weights: Path | None, *, input_size: int | None) -> Backbone:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return Backbone(model=model, name=name, weights_sha256="none", feature_dim=4, input_size=input_size or 32,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")

    assert {"tiny-a", "tiny-b"} <= set(list_backbones())
    with pytest.warns(RandomWeightsWarning):
        tiny = load_backbone("tiny-b", pretrained=False, input_size=40)
    assert tiny.name == "tiny-b" and tiny.input_size == 40 and not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    with pytest.raises(EmbedError, match="did you mean 'tiny-a'"):
        load_backbone("tiny_a", pretrained=False)
    with pytest.raises(ValueError, match="overlaps"):
        register_backbone("tiny-a")(load_tiny)
    with pytest.raises(ValueError, match="overlaps"):
        register_backbone("timm/special")(load_tiny)  # inside the timm/ prefix
    with pytest.raises(ValueError, match="without ','"):
        register_backbone("a,b")(load_tiny)


def test_a_registered_family_embeds_through_the_pipeline(monkeypatch: pytest.MonkeyPatch, tiny_cohort: Path,
                                                         tmp_path: Path) -> None:
    monkeypatch.setattr(backbone_module, "_FAMILIES", list(backbone_module._FAMILIES))

    @register_backbone("mean-rgb")
    def load_mean(name: str, weights: Path | None, *, input_size: int | None) -> Backbone:
        model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return Backbone(model=model, name=name, weights_sha256="none", feature_dim=3, input_size=input_size or 24,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", output="mean RGB")

    cohort = load_cohort(tiny_cohort, CLASSES)
    with pytest.warns(RandomWeightsWarning):
        report = embed_cohort(cohort, tmp_path, EmbedOptions(backbone="mean-rgb", pretrained=False, workers=0,
                                                            progress=False, shard=(0, 8)))
    bag = read_bag(tmp_path / f"{report.written[0]}.h5")
    assert bag.backbone == "mean-rgb" and bag.feature_dim == 3 and bag.attrs["backbone_output"] == "mean RGB"
    assert ((bag.features >= 0) & (bag.features <= 1)).all() and bag.features.std() > 0


def test_the_cli_lists_the_backbones_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "dinobloom-s|b|l|g" in help_text and "timm/<model>" in help_text
