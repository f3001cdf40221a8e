"""MIL models: output contract, invariances, edge cases, CBC fusion, registry and a learning check."""

from __future__ import annotations

import pytest
import torch

from milhema.errors import ConfigError
from milhema.models import (
    FUSION_MODES,
    MILModel,
    MILOutput,
    create_model,
    list_models,
    model_class,
    model_params,
    register_model,
)
from milhema.models import registry as registry_module
from milhema.models.attention import GatedAttention, masked_softmax
from milhema.models.fusion import CBCFusion
from milhema.models.graph import knn_edges

D, K, C, H, N_VIEWS = 8, 3, 5, 16, 2
LENGTHS = (7, 4, 1)                       # a full bag, a padded bag and a one-cell bag



def _cases() -> list[tuple[str, dict]]:
    """Every registered model with its defaults and with each of its ``test_variants`` (as
    scikit-learn's common tests take ``all_estimators()``): a new model is tested without editing this file."""
    return [(name, dict(params)) for name in list_models() for params in ({}, *model_class(name).test_variants)]


CASES = _cases()
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]


def _build(name: str, params: dict, fusion: str = "none", cbc_dim: int = C) -> MILModel:
    torch.manual_seed(0)
    extra = {"n_views": N_VIEWS} if "n_views" in model_params(name) else {}
    return create_model(name, in_dim=D, n_classes=K, cbc_dim=cbc_dim, fusion=fusion, hidden_dim=H, **extra, **params)


def _batch(lengths: tuple[int, ...] = LENGTHS, width: int | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    """Padded batch with distinct random cells (no kNN ties), coords, views (bag 0 has both views) and CBC."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), width or max(max(lengths), 1)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(b, n, D, generator=g)
    coords = torch.rand(b, n, 2, generator=g) * 1000
    view = torch.randint(0, N_VIEWS, (b, n), generator=g)
    if lengths[0] >= 2:
        view[0, :2] = torch.tensor([0, 1])
    x, coords, view = x * mask[..., None], coords * mask[..., None], view * mask
    return {"x": x, "mask": mask, "coords": coords, "view": view, "cbc": torch.randn(b, C, generator=g)}


def _run(model: MILModel, batch: dict[str, torch.Tensor]) -> MILOutput:
    return model(batch["x"], batch["mask"], cbc=batch["cbc"], coords=batch["coords"], view=batch["view"])


def _check_scores(scores: torch.Tensor, mask: torch.Tensor) -> None:
    """>= 0, exactly 0 at padding, sum 1 over valid cells (0 for an empty bag)."""
    assert torch.isfinite(scores).all()
    assert (scores >= 0).all()
    assert (scores[~mask] == 0).all()
    expected = mask.any(1).float()
    torch.testing.assert_close(scores.sum(1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_output_contract(name: str, params: dict, fusion: str) -> None:
    model = _build(name, params, fusion).eval()
    batch = _batch()
    out = _run(model, batch)
    b, n = batch["mask"].shape
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (b, K) and torch.isfinite(out.logits).all()
    assert out.cell_scores.shape == (b, n)
    assert out.embedding.dim() == 2 and out.embedding.shape[0] == b and torch.isfinite(out.embedding).all()
    _check_scores(out.cell_scores, batch["mask"])
    if out.class_cell_scores is not None:
        assert out.class_cell_scores.shape == (b, n, K)
        for k in range(K):
            _check_scores(out.class_cell_scores[..., k], batch["mask"])
        pred = out.logits.argmax(-1)
        torch.testing.assert_close(out.cell_scores, out.class_cell_scores[torch.arange(b), :, pred])
    if "n_views" in model_params(name):  # multi-view models weigh their views
        assert out.view_scores is not None and out.view_scores.shape == (b, N_VIEWS)
        torch.testing.assert_close(out.view_scores.sum(1), torch.ones(b), atol=1e-5, rtol=0)
    else:
        assert out.view_scores is None
    # One-cell bag: all attention on its cell.
    assert out.cell_scores[2, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_padding_garbage_is_ignored(name: str, params: dict, fusion: str) -> None:
    model = _build(name, params, fusion).eval()
    batch = _batch()
    ref = _run(model, batch)
    g = torch.Generator().manual_seed(7)
    b, n = batch["mask"].shape
    extra = 5
    pad = ~torch.cat([batch["mask"], torch.zeros(b, extra, dtype=torch.bool)], 1)
    noisy = {
        "x": torch.cat([batch["x"], torch.zeros(b, extra, D)], 1).masked_scatter(
            pad[..., None].expand(-1, -1, D), 100 * torch.randn(b, n + extra, D, generator=g)),
        "coords": torch.cat([batch["coords"], torch.zeros(b, extra, 2)], 1).masked_fill(pad[..., None], float("nan")),
        "view": torch.cat([batch["view"], torch.zeros(b, extra, dtype=torch.long)], 1).masked_fill(pad, 5),
        "mask": ~pad,
        "cbc": batch["cbc"],
    }
    out = _run(model, noisy)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cell_scores[:, :n], ref.cell_scores, atol=1e-5, rtol=0)
    assert (out.cell_scores[:, n:] == 0).all()


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_permutation_invariance(name: str, params: dict, fusion: str) -> None:
    model = _build(name, params, fusion).eval()
    batch = _batch()
    ref = _run(model, batch)
    g = torch.Generator().manual_seed(3)
    b, n = batch["mask"].shape
    order = torch.arange(n).repeat(b, 1)
    for i, length in enumerate(LENGTHS):
        order[i, :length] = torch.randperm(length, generator=g)
    rows = torch.arange(b)[:, None]
    permuted = {key: (val[rows, order] if key != "cbc" else val) for key, val in batch.items()}
    out = _run(model, permuted)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cell_scores, ref.cell_scores[rows, order], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_empty_and_single_cell_bags(name: str, params: dict, fusion: str) -> None:
    model = _build(name, params, fusion).eval()
    batch = _batch(lengths=(5, 0, 1))
    out = _run(model, batch)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.embedding).all()
    assert (out.cell_scores[1] == 0).all()
    _check_scores(out.cell_scores, batch["mask"])
    if out.view_scores is not None:
        assert (out.view_scores[1] == 0).all() and torch.isfinite(out.view_scores).all()
    # A batch made only of one one-cell bag.
    single = _batch(lengths=(1,))
    out = _run(model, single)
    assert torch.isfinite(out.logits).all()
    assert out.cell_scores[0, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_cbc_changes_logits_unless_unfused(name: str, params: dict, fusion: str) -> None:
    model = _build(name, params, fusion).eval()
    batch = _batch()
    ref = _run(model, batch)
    other = dict(batch, cbc=batch["cbc"] + torch.randn(batch["cbc"].shape, generator=torch.Generator().manual_seed(5)))
    out = _run(model, other)
    if fusion == "none":
        torch.testing.assert_close(out.logits, ref.logits)
    else:
        assert (out.logits - ref.logits).abs().max() > 1e-5


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_without_cbc_every_mode_is_none(fusion: str) -> None:
    model = _build("abmil", {}, fusion, cbc_dim=0).eval()
    assert model.fusion.mode == "none"
    batch = _batch()
    out = model(batch["x"], batch["mask"])
    assert torch.isfinite(out.logits).all()


def test_missing_cbc_is_an_error() -> None:
    model = _build("abmil", {}, "concat")
    batch = _batch()
    with pytest.raises(ValueError, match="cbc is None"):
        model(batch["x"], batch["mask"])


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_backward_gives_finite_gradients(name: str, params: dict, fusion: str) -> None:
    model = _build(name, params, fusion).train()
    batch = _batch(lengths=(7, 0, 1, 4))          # includes an empty bag
    out = _run(model, batch)
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0]))
    loss = loss + 1e-2 * out.embedding.pow(2).mean()
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("view_pool", ["max", "attention"])
def test_multiview_missing_view(view_pool: str) -> None:
    model = _build("multiview", {"view_pool": view_pool}).eval()
    batch = _batch()
    batch["view"] = torch.zeros_like(batch["view"])
    batch["view"][0, :3] = 1                       # only bag 0 has view 1
    out = _run(model, batch)
    assert torch.isfinite(out.logits).all()
    assert out.view_scores[0, 1] > 0
    assert (out.view_scores[1:, 1] == 0).all()
    torch.testing.assert_close(out.view_scores[1:, 0], torch.ones(2))
    _check_scores(out.cell_scores, batch["mask"])
    # view=None means every cell is view 0.
    none = model(batch["x"], batch["mask"])
    assert (none.view_scores[:, 1] == 0).all()
    with pytest.raises(ValueError, match="view ids"):
        model(batch["x"], batch["mask"], view=torch.full_like(batch["view"], N_VIEWS))


def test_knn_edges_clip_k_and_ignore_padding() -> None:
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    points = torch.tensor([[[0.0], [1.0], [3.0], [1.1]], [[5.0], [0.0], [0.0], [0.0]]])
    bag, src, tgt = knn_edges(points, mask, k=8)
    edges = set(zip(bag.tolist(), src.tolist(), tgt.tolist(), strict=True))
    # k clipped to n_valid - 1 = 2 in bag 0, no self-loops, no padding node, nothing in the one-cell bag.
    assert edges == {(0, 1, 0), (0, 2, 0), (0, 0, 1), (0, 2, 1), (0, 1, 2), (0, 0, 2)}
    bag, src, tgt = knn_edges(points, mask, k=1)
    assert set(zip(src.tolist(), tgt.tolist(), strict=True)) == {(1, 0), (0, 1), (1, 2)}


def test_graph_coords_space_uses_coords_and_falls_back_on_nan() -> None:
    model = _build("graph", {"graph_space": "coords", "k": 1}).eval()
    batch = _batch(lengths=(6, 6))
    coords = torch.tensor([[0.0, 0], [1, 0], [10, 0], [11, 0], [20, 0], [21, 0]]).expand(2, -1, -1).clone()
    h = torch.randn(2, 6, H)
    points = model._points(h, batch["mask"], coords)
    bag, src, tgt = knn_edges(points, batch["mask"], 1)
    assert {(s, t) for s, t in zip(src.tolist(), tgt.tolist(), strict=True)} == {(1, 0), (0, 1), (3, 2), (2, 3), (5, 4), (4, 5)}
    coords[1, 2] = float("nan")               # bag 1 has no usable coordinates -> features
    points = model._points(h, batch["mask"], coords)
    torch.testing.assert_close(points[1], h[1])
    out = model(batch["x"], batch["mask"], cbc=batch["cbc"], coords=coords)
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(model(batch["x"], batch["mask"], cbc=batch["cbc"]).logits).all()   # coords=None


def test_masked_softmax_empty_rows_have_zero_weight_and_gradient() -> None:
    logits = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    w = masked_softmax(logits, mask, dim=1)
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 0.0]))
    assert (w[~mask] == 0).all()
    (w * torch.randn(2, 4) * 1e6).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()


def test_gated_attention_branches_and_condition() -> None:
    torch.manual_seed(0)
    att = GatedAttention(H, 4, n_branches=3, cond_dim=4)
    h, mask = torch.randn(2, 5, H), torch.tensor([[True] * 5, [True, True, False, False, False]])
    w = att(h, mask)
    assert w.shape == (2, 5, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 3))
    assert not torch.allclose(att(h, mask, torch.randn(2, 4) * 3), w)
    with pytest.raises(ValueError, match="cond_dim=0"):
        GatedAttention(H, 4)(h, mask, torch.randn(2, 4))


def test_fusion_modes() -> None:
    torch.manual_seed(0)
    h, z, cbc = torch.randn(2, 5, H), torch.randn(2, H), torch.randn(2, C)
    film = CBCFusion("film", C, embed_dim=H, cell_dim=H, gate_dim=4)
    assert (film.cells(h, cbc) - h).abs().max() < 0.5 * h.abs().max()      # starts near identity
    bilinear = CBCFusion("bilinear", C, embed_dim=H, cell_dim=H, gate_dim=4)
    assert bilinear.out_dim == 33 * 9 and bilinear.bag(z, cbc).shape == (2, 33 * 9)
    concat = CBCFusion("concat", C, embed_dim=H, cell_dim=H, gate_dim=4)
    assert concat.bag(z, cbc).shape == (2, concat.out_dim) and torch.equal(concat.bag(z, cbc)[:, :H], z)
    gated = CBCFusion("gated", C, embed_dim=H, cell_dim=H, gate_dim=4)
    assert gated.gate(cbc).shape == (2, 4) and gated.bag(z, cbc) is z and gated.cells(h, cbc) is h
    assert concat.gate(cbc) is None
    with pytest.raises(ConfigError, match="fusion mode 'kron'"):
        CBCFusion("kron", C, embed_dim=H, cell_dim=H, gate_dim=4)


def test_registry_lists_every_model() -> None:
    assert set(list_models()) >= {"meanpool", "maxpool", "abmil", "dsmil", "transformer", "multiview", "graph"}


def test_registry_errors_are_helpful() -> None:
    with pytest.raises(ConfigError, match=r"model 'abmill' is not registered; available: .*did you mean 'abmil'"):
        create_model("abmill", in_dim=D, n_classes=K)
    with pytest.raises(ConfigError, match=r"no parameter 'hiden_dim'.*did you mean 'hidden_dim'.*valid parameters: .*dropout"):
        create_model("abmil", in_dim=D, n_classes=K, hiden_dim=32)
    with pytest.raises(ConfigError, match="'hidden_dim' must be int"):
        create_model("abmil", in_dim=D, n_classes=K, hidden_dim="32")
    with pytest.raises(ConfigError, match="view_pool must be one of max, attention"):
        create_model("multiview", in_dim=D, n_classes=K, view_pool="mean")
    with pytest.raises(ConfigError, match="conv must be one of"):
        create_model("graph", in_dim=D, n_classes=K, conv="gcn")
    with pytest.raises(ConfigError, match="dropout must be in"):
        create_model("meanpool", in_dim=D, n_classes=K, dropout=1.5)
    with pytest.raises(ConfigError, match="fusion mode 'kron'"):
        create_model("abmil", in_dim=D, n_classes=K, cbc_dim=C, fusion="kron")
    with pytest.raises(ConfigError, match="n_heads"):
        create_model("transmil", in_dim=D, n_classes=K, hidden_dim=H, n_heads=3)


def test_register_model_decorator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_model("tiny")
    class Tiny(MILModel):
        def __init__(self, in_dim: int, n_classes: int, *, cbc_dim: int = 0, fusion: str = "none",
                     hidden_dim: int = 128, dropout: float = 0.25, scale: float = 1.0) -> None:
            super().__init__(in_dim, n_classes, cbc_dim=cbc_dim, fusion=fusion, hidden_dim=hidden_dim, dropout=dropout)
            self.scale = scale

    Tiny.test_variants = ({"scale": 2.0},)
    assert "tiny" in list_models()
    assert isinstance(create_model("tiny", in_dim=D, n_classes=K, scale=2), Tiny)
    # The common tests' cases come from the registry: a new model and its variants join them unasked.
    assert {("tiny", ()), ("tiny", (("scale", 2.0),))} <= {(n, tuple(p.items())) for n, p in _cases()}
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny")(type("Other", (Tiny,), {}))
    with pytest.raises(TypeError):
        register_model("bad")(int)


def test_abmil_learns_a_planted_signal() -> None:
    """Positive bags hide 2 of 20 cells shifted by 4 SD along one direction; ABMIL must find them."""
    g = torch.Generator().manual_seed(0)
    n_bags, n_cells, dim = 64, 20, 16
    x = torch.randn(n_bags, n_cells, dim, generator=g)
    y = torch.arange(n_bags) % 2
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    planted = torch.zeros(n_bags, n_cells, dtype=torch.bool)
    planted[y == 1, :2] = True
    x = x + 4.0 * planted[..., None] * direction
    mask = torch.ones(n_bags, n_cells, dtype=torch.bool)

    torch.manual_seed(0)
    model = create_model("abmil", in_dim=dim, n_classes=2, hidden_dim=32, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x, mask).logits, y).backward()
        opt.step()

    model.eval()
    with torch.no_grad():
        out = model(x, mask)
    assert (out.logits.argmax(-1) == y).float().mean() > 0.9
    # Per positive bag AUROC of cell scores for planted vs other cells (pairwise ranking).
    scores = out.cell_scores[y == 1]
    pos, neg = scores[:, :2], scores[:, 2:]
    auroc = (pos[:, :, None] > neg[:, None, :]).float().mean(dim=(1, 2))
    assert auroc.mean() > 0.9


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_bfloat16_autocast_matches_float32(name: str, params: dict, fusion: str) -> None:
    """The GPU training path (bf16 autocast) exercised on CPU: finite outputs and gradients, scores
    still a distribution over valid cells, logits close to float32."""
    model = _build(name, params, fusion).train()
    batch = _batch(lengths=(7, 0, 1, 4))
    model.eval()
    reference = _run(model, batch).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(model, batch)
    torch.testing.assert_close(out.logits.float(), reference, atol=0.1, rtol=0.05)
    scores = out.cell_scores.float()
    assert torch.isfinite(scores).all() and (scores[~batch["mask"]] == 0).all()
    torch.testing.assert_close(scores.sum(1), batch["mask"].any(1).float(), atol=2e-2, rtol=0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(_run(model, batch).logits.float(), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dsmil_trains_each_stream_on_its_own_and_averages_their_probabilities() -> None:
    """DSMIL (Li et al. 2021): 0.5 · loss(max-instance stream) + 0.5 · loss(bag stream), and the prediction
    is the mean of the two streams' probabilities, so the instance classifier is supervised on its own."""
    from milhema.train.loop import task_loss

    model = _build("dsmil", {}, "none").eval()
    batch = _batch()
    out = _run(model, batch)
    assert out.stream_logits is not None and len(out.stream_logits) == 2
    max_stream, bag_stream = out.stream_logits
    expected = 0.5 * (torch.softmax(max_stream, -1) + torch.softmax(bag_stream, -1))
    torch.testing.assert_close(torch.softmax(out.logits, -1), expected, atol=1e-6, rtol=0)
    y = torch.tensor([0, 1, 2])
    loss = task_loss(model, out, y, torch.zeros(3), torch.zeros(3), None, 1.0, 0.0)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss, 0.5 * ce(max_stream, y) + 0.5 * ce(bag_stream, y))
    # The max-instance loss alone reaches the instance classifier (it picks the critical cells).
    model.zero_grad()
    ce(max_stream, y).backward(retain_graph=True)
    assert model.instance_classifier.weight.grad.abs().sum() > 0


def test_graph_in_slide_space_links_cells_of_one_smear_only() -> None:
    """A patient bag joins smears whose pixel coordinates are separate spaces: moving a whole smear
    elsewhere in 'its' coordinates must not change the model, and no edge may cross smears."""
    model = _build("graph", {"graph_space": "coords", "k": 3}).eval()
    g = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(1, n, D, generator=g)
    coords = torch.rand(1, n, 2, generator=g) * 500
    coords[0, 6:] = coords[0, :6]                       # the second smear reuses the first one's pixels
    slide = torch.tensor([[0] * 6 + [1] * 6])
    mask = torch.ones(1, n, dtype=torch.bool)
    bag, src, tgt = knn_edges(coords, mask, 3, slide)
    assert (slide[bag, src] == slide[bag, tgt]).all() and len(src) == n * 3
    out = model(x, mask, cbc=None, coords=coords, slide=slide)
    moved = coords.clone()
    moved[0, 6:] += 10_000.0
    again = model(x, mask, cbc=None, coords=moved, slide=slide)
    torch.testing.assert_close(out.logits, again.logits)
    torch.testing.assert_close(out.cell_scores, again.cell_scores)


def test_the_readme_model_table_names_every_registered_model() -> None:
    """Names are promises: every model has a README row saying what it is, and every row is a model."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| model (`model.name`)"):]
    table = table[: table.index("\n\n")]
    named = set(re.findall(r"`([a-z_]+)`", "\n".join(row.split("|")[1] for row in table.splitlines()[2:])))
    assert named == set(list_models(aliases=True))


def test_an_alias_builds_the_model_it_stands_for() -> None:
    from milhema.models import canonical_name

    assert "transmil" not in list_models() and "transmil" in list_models(aliases=True)
    assert canonical_name("transmil") == "transformer"
    assert type(create_model("transmil", in_dim=D, n_classes=K, hidden_dim=H)) is model_class("transformer")
