"""Detection transformers (DETR, Conditional DETR, Deformable DETR) from save_pretrained folders:
tiny models built from configs here (a tiny transformers ResNet backbone, nothing downloaded), their
boxes, class scores and maps checked against the model's own outputs (``output_attentions=True``)
and a Grad-CAM written out with hooks here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import attnexplain  # noqa: E402
from attnexplain.cli import main  # noqa: E402
from attnexplain.engine import compute_maps  # noqa: E402
from attnexplain.errors import MethodError, ModelLoadError  # noqa: E402
from attnexplain.images import load_image  # noqa: E402
from attnexplain.loading import load_model  # noqa: E402
from attnexplain.methods import METHODS  # noqa: E402
from attnexplain.preprocess import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
IMAGE = REPO / "samples" / "images" / "cat-on-grass.png"
LABELS = {0: "tabby", 1: "rocket", 2: "mug", 3: "grass"}
LABELS_INDEX = {label: index for index, label in LABELS.items()}
SAMPLES = ("cat-on-grass.png", "rocket-on-brick.png")
QUERIES = 8
SIDE = 64  # the processor's shortest_edge: a 64-pixel square input, the photo letterboxed into it
STRIDE = 8  # the tiny ResNet: a stride-4 stem and one stride-2 stage


def _build(family: str, seed: int = 0, labels: dict[int, str] = LABELS):
    t = transformers
    backbone = t.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", out_features=["stage2"]
    )
    common = dict(
        backbone_config=backbone,
        num_queries=QUERIES,
        encoder_layers=1,
        decoder_layers=2,
        d_model=32,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    if family == "detr":
        model_class, config = t.DetrForObjectDetection, t.DetrConfig(**common)
    elif family == "conditional_detr":
        model_class, config = t.ConditionalDetrForObjectDetection, t.ConditionalDetrConfig(**common)
    else:
        config = t.DeformableDetrConfig(num_feature_levels=1, encoder_n_points=2, decoder_n_points=2, **common)
        model_class = t.DeformableDetrForObjectDetection
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # A random decoder's queries come out nearly alike, so every query would pick the same class:
    # the class heads here read what sets the queries apart (their outputs less their mean on a
    # noise image, whitened), so that queries disagree, as a trained DETR's do.
    with torch.no_grad():
        if family != "deformable_detr":  # queries that attend to different places
            model.model.query_position_embeddings.weight.normal_(0, 10)
            for layer in model.model.decoder.layers:
                for attention in (layer.self_attn, layer.encoder_attn):
                    for name in ("q_proj", "sa_qpos_proj", "ca_qpos_proj"):
                        if hasattr(attention, name):
                            getattr(attention, name).weight.mul_(10)
        if family == "conditional_detr":
            return model  # its queries disagree as built; its test needs no spread of classes
        hidden = model(pixel_values=torch.rand(1, 3, SIDE, SIDE)).last_hidden_state[0]
        mean = hidden.mean(dim=0)
        _, spread, directions = torch.linalg.svd(hidden - mean, full_matrices=False)
        kept = torch.arange(len(spread)) < 3  # the three main directions
        reading = directions[kept] / spread[kept, None]
        heads = model.class_embed if family == "deformable_detr" else [model.class_labels_classifier]
        for head in heads:
            head.weight.copy_(3 * torch.randn(head.out_features, int(kept.sum())) @ reading)
            head.bias.copy_(-head.weight @ mean)
    return model


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor = transformers.DetrImageProcessor(size={"shortest_edge": SIDE, "longest_edge": 2 * SIDE})
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detr(tmp_path_factory):
    """(folder written by save_pretrained, the model that wrote it)."""
    model = _build("detr")
    return _save(model, tmp_path_factory.mktemp("detr") / "detr"), model


def _input(folder: Path):
    """The preprocessed photo, as attnexplain prepares it for the folder's model, and its box."""
    loaded = load_model(folder)
    prepared = prepare(load_image(IMAGE).pixels, loaded.preprocessing)
    return loaded, prepared


def _with_attentions(model, batch):
    """transformers' own output with ``output_attentions=True`` (which eager attention returns)."""
    previous, model.config._attn_implementation = model.config._attn_implementation, "eager"
    try:
        with torch.no_grad():
            return model(pixel_values=batch, output_attentions=True)
    finally:
        model.config._attn_implementation = previous


def _by_hand(model, batch):
    """Each query's best class, its probability (no-object left out) and box in input pixels."""
    output = _with_attentions(model, batch)
    probabilities = output.logits.softmax(-1)[0, :, :-1]
    scores, labels = probabilities.max(-1)
    cx, cy, w, h = output.pred_boxes[0].unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * SIDE
    return output, scores, labels, boxes


def test_a_detr_folder_loads_as_a_detector_with_its_processor(detr):
    folder, _ = detr
    loaded = load_model(folder)
    assert loaded.plugin.name == "transformers" and loaded.plugin.task(loaded.module) == "detection"
    assert loaded.labels == list(LABELS.values())
    prep = loaded.preprocessing
    assert prep.size == (SIDE, SIDE) and prep.letterbox and prep.mean == pytest.approx((0.485, 0.456, 0.406))
    assert loaded.plugin.default_layer(loaded.module) == "model.backbone.model.encoder.stages.1"
    assert loaded.plugin.default_method(loaded.module) == "attention"


def test_run_reports_every_query_as_a_box_and_explains_the_best(detr, tmp_path):
    folder, model = detr
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(folder), str(IMAGE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((next(out.iterdir()) / "report.json").read_text())
    assert report["model"]["task"] == "detection" and report["methods"] == ["attention"]

    _, prepared = _input(folder)
    _, scores, labels, boxes = _by_hand(model, prepared.tensor)
    order = torch.argsort(scores, descending=True, stable=True)
    detections = report["detections"]
    assert len(detections) == QUERIES
    assert [d["score"] for d in detections] == pytest.approx(scores[order].tolist(), abs=1e-6)
    assert [d["label"] for d in detections] == [LABELS[int(i)] for i in labels[order]]
    # In photo pixels: the letterboxed input's box maps back to the photo, clipped to it.
    left, top, right, bottom = prepared.box
    width, height = load_image(IMAGE).size
    xs = (boxes[order][:, [0, 2]] * (right - left) / SIDE + left).clamp(0, width)
    ys = (boxes[order][:, [1, 3]] * (bottom - top) / SIDE + top).clamp(0, height)
    expected = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)
    np.testing.assert_allclose(np.array([d["box"] for d in detections]), expected.numpy(), atol=0.02)
    # The class score is its best query's probability; the best box is the one explained.
    assert detections[0]["explained"] and sum(d["explained"] for d in detections) == 1
    assert report["target"]["label"] == detections[0]["label"]
    assert report["predictions"][0]["prob"] == pytest.approx(detections[0]["score"], abs=1e-6)


def _grid(output, layer: int, query: int) -> np.ndarray:
    """A decoder layer's cross-attention of one query, every head, on the feature grid."""
    attention = output.cross_attentions[layer][0, :, query]  # (heads, image tokens)
    return attention.reshape(attention.shape[0], -(-SIDE // STRIDE), -(-SIDE // STRIDE)).numpy()


def test_target_label_maps_its_best_query_cross_attention(detr):
    folder, model = detr
    loaded, prepared = _input(folder)
    output, scores, labels, _ = _by_hand(model, prepared.tensor)
    top = int(labels[scores.argmax()])
    other = next(int(c) for c in labels.unique() if int(c) != top)
    of_other = torch.nonzero(labels == other)[:, 0]
    best = int(of_other[scores[of_other].argmax()])

    explained = attnexplain.explain(loaded, IMAGE, "attention", target=LABELS[other])
    grid = explained.maps["attention"].attention_grid  # (layers, heads, h, w)
    assert grid.shape == (2, 2, SIDE // STRIDE, SIDE // STRIDE)
    for layer in range(2):
        np.testing.assert_allclose(grid[layer], _grid(output, layer, best), atol=1e-6)
    chosen = [d for d in explained.detections if d["explained"]]
    assert len(chosen) == 1 and chosen[0]["label"] == LABELS[other]
    assert chosen[0]["score"] == pytest.approx(float(scores[best]), abs=1e-6)


def test_box_n_explains_the_nth_box_by_score(detr, tmp_path):
    folder, model = detr
    loaded, prepared = _input(folder)
    output, scores, labels, _ = _by_hand(model, prepared.tensor)
    order = torch.argsort(scores, descending=True, stable=True)
    # A box that is not its class's best: its own score, not its class's, is the target's.
    rank = next(n for n in range(1, QUERIES) if any(int(labels[order[k]]) == int(labels[order[n]]) for k in range(n)))
    query = int(order[rank])
    explained = attnexplain.explain(loaded, IMAGE, "attention", target=f"box:{rank}")
    chosen = [i for i, d in enumerate(explained.detections) if d["explained"]]
    assert chosen == [rank]
    assert explained.target.label == LABELS[int(labels[query])]
    assert explained.target.prob == pytest.approx(float(scores[query]), abs=1e-6)
    assert explained.target.prob < float(scores[order[0]])
    np.testing.assert_allclose(explained.maps["attention"].attention_grid[-1], _grid(output, 1, query), atol=1e-6)

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(folder), str(IMAGE), "--target", "box:1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((next(out.iterdir()) / "report.json").read_text())
    assert [d["explained"] for d in report["detections"]].index(True) == 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (f"box:{QUERIES}", f"Target box:{QUERIES} is out of range: the model detected {QUERIES} boxes"),
        ("box:one", "box:N takes a whole number N from 0"),
    ],
)
def test_a_bad_box_target_is_one_line(detr, tmp_path, target, message):
    folder, _ = detr
    result = CliRunner().invoke(main, ["run", str(folder), str(IMAGE), "--target", target, "--out", str(tmp_path)])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_several_targets_on_a_detr_give_each_label_its_best_boxs_map_and_box_n_stays_alone(detr, tmp_path):
    folder, model = detr
    loaded, prepared = _input(folder)
    _, scores, labels, _ = _by_hand(model, prepared.tensor)
    present = [LABELS[int(c)] for c in labels.unique()][:2]
    explained = attnexplain.explain(loaded, IMAGE, "chefer", target=present)
    assert list(explained.maps) == [f"chefer@{label}" for label in present]
    for label in present:
        alone = attnexplain.explain(loaded, IMAGE, "chefer", target=label)
        np.testing.assert_allclose(explained.maps[f"chefer@{label}"].heatmap, alone.heatmap, atol=1e-6)
        assert explained.maps[f"chefer@{label}"].target.label == label
    result = CliRunner().invoke(
        main, ["run", str(folder), str(IMAGE), "--target", "box:0,box:2", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "Explain each box:N on its own" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_box_n_on_a_classifier_or_with_a_perturbation_method_is_refused(detr, tmp_path):
    classifier = tmp_path / "vit"
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    transformers.ViTForImageClassification(config).save_pretrained(classifier)
    with pytest.raises(MethodError, match="not a detector"):
        attnexplain.explain(load_model(classifier), IMAGE, "gradcam", target="box:0")
    with pytest.raises(MethodError, match="changed inputs"):
        attnexplain.explain(load_model(detr[0]), IMAGE, "occlusion", target="box:0")


def test_gradcam_on_the_backbone_matches_hooks_written_here(detr):
    folder, model = detr
    loaded, prepared = _input(folder)
    batch = prepared.tensor
    layer_name = loaded.plugin.default_layer(loaded.module)
    computed = compute_maps(loaded, batch, [METHODS["gradcam"]], [layer_name], target="box:2")
    layer = model.model.backbone.model.encoder.stages[1]
    kept = {}
    handle = layer.register_forward_hook(lambda m, i, o: kept.update(activation=o))
    try:
        output = model(pixel_values=batch.clone().requires_grad_(True))  # DETR freezes its stem's weights
    finally:
        handle.remove()
    activation = kept["activation"]
    gradient = {}
    activation.register_hook(lambda g: gradient.update(value=g))
    probabilities = output.logits.softmax(-1)[0, :, :-1]
    best, labels = probabilities.detach().max(-1)
    query = int(torch.argsort(best, descending=True, stable=True)[2])
    probabilities[query, labels[query]].backward()
    weights = gradient["value"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1)).detach()
    expected = F.interpolate(cam[:, None], size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0, 0]
    assert int(computed.targets[0]) == int(labels[query])
    np.testing.assert_allclose(computed.maps["gradcam"][0].numpy(), expected.numpy(), rtol=1e-4, atol=1e-7)
    assert float(expected.max()) > 0


def test_conditional_detr_records_its_cross_attention(tmp_path):
    model = _build("conditional_detr")
    folder = _save(model, tmp_path / "conditional")
    loaded, prepared = _input(folder)
    output = _with_attentions(model, prepared.tensor)
    scores, labels = output.logits.sigmoid()[0].max(-1)  # focal loss: a sigmoid per class
    explained = attnexplain.explain(loaded, IMAGE, "attention")
    assert explained.detections[0]["score"] == pytest.approx(float(scores.max()), abs=1e-6)
    np.testing.assert_allclose(
        explained.maps["attention"].attention_grid[0], _grid(output, 0, int(scores.argmax())), atol=1e-6
    )


def _chefer_by_hand(model, batch, query: int, label: int, sigmoid: bool = False) -> np.ndarray:
    """Chefer et al. 2021b's relevance of one query (its best class's probability) written out from
    transformers' own ``output_attentions=True`` tensors with their gradients retained: Ā = mean over
    heads of (∇A ⊙ A)⁺; R_ii = I, R_qq = I, R_qi = 0; an encoder layer R_ii += Ā·R_ii; a decoder
    layer's self-attention R_qq += Ā·R_qq and R_qi += Ā·R_qi, then its cross-attention
    R_qi += R̄_qqᵀ·Ā·R̄_ii with R̄ = (R − I) / rowsum(R − I) + I (eqs. 5-10). The score's gradient
    reaches every layer here because the parameters are not frozen."""
    previous, model.config._attn_implementation = model.config._attn_implementation, "eager"
    try:
        output = model(pixel_values=batch.clone().requires_grad_(True), output_attentions=True)
    finally:
        model.config._attn_implementation = previous
    layers = [*output.encoder_attentions, *output.decoder_attentions, *output.cross_attentions]
    for attention in layers:
        attention.retain_grad()
    probabilities = output.logits.sigmoid() if sigmoid else output.logits.softmax(-1)[..., :-1]
    probabilities[0, query, label].backward()

    def weighted(attention):
        return (attention.grad * attention).clamp(min=0).mean(dim=1)[0].detach()

    def normalised(relevance):
        # Eqs. 8-9 are 0/0 for a row that no self-attention added to (a DETR's first decoder layer
        # reads zeros, so its Ā has such rows): it keeps the identity's row, R − I's row stays 0.
        eye = torch.eye(relevance.shape[0])
        sums = (relevance - eye).sum(dim=-1, keepdim=True)
        return (relevance - eye) / torch.where(sums == 0, 1.0, sums) + eye

    queries, tokens = output.cross_attentions[0].shape[-2:]
    r_ii, r_qq, r_qi = torch.eye(tokens), torch.eye(queries), torch.zeros(queries, tokens)
    for attention in output.encoder_attentions:
        r_ii = r_ii + weighted(attention) @ r_ii
    for self_attention, cross_attention in zip(output.decoder_attentions, output.cross_attentions):
        a = weighted(self_attention)
        r_qq, r_qi = r_qq + a @ r_qq, r_qi + a @ r_qi
        r_qi = r_qi + normalised(r_qq).T @ weighted(cross_attention) @ normalised(r_ii)
    side = -(-SIDE // STRIDE)
    return r_qi[query].reshape(side, side).numpy()


def _grid_map(explained, method: str) -> np.ndarray:
    """The map on the feature grid: the pipeline's map is it upsampled, so pooling undoes it."""
    heatmap = torch.as_tensor(explained.maps[method].raw_heatmap)[None, None]
    return F.adaptive_avg_pool2d(heatmap, SIDE // STRIDE)[0, 0].numpy()


def test_chefer_on_a_detr_is_the_papers_encoder_decoder_relevance_of_the_box_query(detr):
    folder, model = detr
    loaded, prepared = _input(folder)
    _, scores, labels, _ = _by_hand(model, prepared.tensor)
    order = torch.argsort(scores, descending=True, stable=True)
    rank = 2
    query = int(order[rank])
    explained = attnexplain.explain(loaded, IMAGE, "chefer", target=f"box:{rank}")
    expected = _chefer_by_hand(model, prepared.tensor, query, int(labels[query]))
    assert explained.target.label == LABELS[int(labels[query])]
    computed = compute_maps(loaded, prepared.tensor, [METHODS["chefer"]], [], target=f"box:{rank}")
    upsampled = F.interpolate(torch.from_numpy(expected)[None, None], size=(SIDE, SIDE), mode="bilinear")
    np.testing.assert_allclose(computed.maps["chefer"][0].numpy(), upsampled[0, 0].numpy(), rtol=1e-4, atol=1e-6)
    assert float(expected.max()) > 0 and float(expected.std()) > 0
    # Another box's query gives another map: the relevance is the explained query's.
    other = compute_maps(loaded, prepared.tensor, [METHODS["chefer"]], [], target="box:0")
    assert not np.allclose(other.maps["chefer"][0].numpy(), computed.maps["chefer"][0].numpy(), atol=1e-6)


def test_chefer_on_a_detr_target_label_explains_its_best_box(detr):
    folder, model = detr
    loaded, prepared = _input(folder)
    _, scores, labels, _ = _by_hand(model, prepared.tensor)
    top = int(labels[scores.argmax()])
    other = next(int(c) for c in labels.unique() if int(c) != top)
    of_other = torch.nonzero(labels == other)[:, 0]
    best = int(of_other[scores[of_other].argmax()])
    computed = compute_maps(loaded, prepared.tensor, [METHODS["chefer"]], [], target=LABELS[other])
    expected = F.interpolate(
        torch.from_numpy(_chefer_by_hand(model, prepared.tensor, best, other))[None, None],
        size=(SIDE, SIDE),
        mode="bilinear",
    )
    np.testing.assert_allclose(computed.maps["chefer"][0].numpy(), expected[0, 0].numpy(), rtol=1e-4, atol=1e-6)


def test_chefer_runs_through_the_cli_beside_attention_and_gradcam(detr, tmp_path):
    out = tmp_path / "out"
    arguments = ["run", str(detr[0]), str(IMAGE), "--method", "chefer,attention,gradcam", "--out", str(out)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    folder = next(out.iterdir())
    report = json.loads((folder / "report.json").read_text())
    assert report["methods"] == ["chefer", "attention", "gradcam"] and report["class_agnostic"] == ["attention"]
    heatmap = np.load(folder / "heatmap-chefer.npy")
    assert heatmap.shape == (SIDE, SIDE) and np.isfinite(heatmap).all() and heatmap.max() > heatmap.min()
    assert report["maps"]["chefer"]["max"] > report["maps"]["chefer"]["min"] >= 0
    assert sum(d["explained"] for d in report["detections"]) == 1


def test_conditional_detr_chefer_matches_the_papers_rules(tmp_path):
    model = _build("conditional_detr")
    folder = _save(model, tmp_path / "conditional")
    loaded, prepared = _input(folder)
    scores, labels = _with_attentions(model, prepared.tensor).logits.sigmoid()[0].max(-1)
    query = int(scores.argmax())
    computed = compute_maps(loaded, prepared.tensor, [METHODS["chefer"]], [])
    expected = _chefer_by_hand(model, prepared.tensor, query, int(labels[query]), sigmoid=True)
    upsampled = F.interpolate(torch.from_numpy(expected)[None, None], size=(SIDE, SIDE), mode="bilinear")
    np.testing.assert_allclose(computed.maps["chefer"][0].numpy(), upsampled[0, 0].numpy(), rtol=1e-4, atol=1e-6)


def test_deformable_detr_gets_cams_and_a_reason_for_no_attention(tmp_path):
    folder = _save(_build("deformable_detr"), tmp_path / "deformable")
    loaded = load_model(folder)
    assert loaded.plugin.default_method(loaded.module) == "gradcam"
    explained = attnexplain.explain(loaded, IMAGE)
    assert explained.method == "gradcam" and np.isfinite(explained.heatmap).all()
    assert sum(d["explained"] for d in explained.detections) == 1
    result = CliRunner().invoke(main, ["run", str(folder), str(IMAGE), "--method", "attention", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "learned offsets" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["run", str(folder), str(IMAGE), "--method", "chefer", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "learned offsets" in result.output


def test_rollout_on_a_detr_says_it_attends_across(detr, tmp_path):
    result = CliRunner().invoke(main, ["run", str(detr[0]), str(IMAGE), "--method", "rollout", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "cross-attention" in result.output and "--method chefer" in result.output


def test_a_timm_backbone_fetched_from_elsewhere_is_refused(detr, tmp_path):
    folder = tmp_path / "hub-backbone"
    detr[1].save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["backbone_config"] = {"model_type": "timm_backbone", "backbone": "hf-hub:someone/resnet"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="which timm would fetch"):
        load_model(folder)


def test_batch_records_the_nth_box_of_every_image(detr, tmp_path):
    folder, model = detr
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat-on-grass.png", "rocket-on-brick.png"):
        (photos / name).write_bytes((IMAGE.parent / name).read_bytes())
    out = tmp_path / "batch"
    arguments = ["batch", str(folder), str(photos), "--out", str(out), "--target", "box:1", "--quiet"]
    result = CliRunner().invoke(main, [*arguments, "--method", "attention,gradcam"])
    assert result.exit_code == 0, result.output
    records = {r["image"]: r for r in map(json.loads, (out / "results.jsonl").open())}
    assert set(records) == {"cat-on-grass.png", "rocket-on-brick.png"}
    loaded = load_model(folder)
    for name, record in records.items():
        assert [d["explained"] for d in record["detections"]].index(True) == 1
        prepared = prepare(load_image(photos / name).pixels, loaded.preprocessing)
        _, scores, labels, _ = _by_hand(model, prepared.tensor)
        second = int(torch.argsort(scores, descending=True, stable=True)[1])
        assert record["target"]["label"] == LABELS[int(labels[second])]
        assert record["target"]["prob"] == pytest.approx(float(scores[second]), abs=1e-5)


def test_another_transformers_detector_is_named_as_one(tmp_path):
    config = transformers.YolosConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=[32, 32]
    )
    folder = tmp_path / "yolos"
    transformers.YolosForObjectDetection(config).save_pretrained(folder)
    result = CliRunner().invoke(main, ["run", str(folder), str(IMAGE), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "holds a 'yolos' object detector" in result.output
    assert "image classifier for" not in result.output and len(result.output.strip().splitlines()) == 1


def test_id2label_with_gaps_keeps_each_label_at_its_class_id(tmp_path):
    """COCO-style ids skip numbers: transformers sizes the head by how many names there are, and a
    class index reads ``id2label[index]`` (its post-processing's convention), so each name stays at
    its id, a gap is named "class N", and an id past the head is left out with a note."""
    gapped = {1: "tabby", 2: "rocket", 4: "mug"}
    model = _build("detr", labels=gapped)
    folder = _save(model, tmp_path / "gapped")
    loaded = load_model(folder)
    assert loaded.labels == ["class 0", "tabby", "rocket"]
    assert any("class ids 4 beyond the model's 3 classes" in note for note in loaded.notes)
    explained = attnexplain.explain(loaded, IMAGE, "gradcam")
    _, prepared = _input(folder)
    _, scores, labels, _ = _by_hand(model, prepared.tensor)
    by_score = [int(labels[i]) for i in torch.argsort(scores, descending=True, stable=True)]
    assert [d["label"] for d in explained.detections] == [gapped.get(i, f"class {i}") for i in by_score]
    rocket = attnexplain.explain(loaded, IMAGE, "gradcam", target="rocket") if 2 in by_score else None
    assert rocket is None or rocket.target.index == 2

    # A head sized before id2label was swapped for COCO-style ids (as transformers' DETR conversion
    # scripts do): every name at its id, in memory and from disk (the head's size read from the
    # weights' header; transformers alone would build a smaller head and refuse the weights).
    memory = _build("detr", labels={index: f"x{index}" for index in range(6)})
    memory.config.id2label = {1: "tabby", 2: "rocket", 4: "mug", 5: "grass"}
    from attnexplain_transformers.plugin import plugin

    names = ["class 0", "tabby", "rocket", "class 3", "mug", "grass"]
    assert plugin.labels(memory) == names
    in_memory = dataclasses.replace(load_model(memory), preprocessing=loaded.preprocessing)
    assert in_memory.labels == names
    explained = attnexplain.explain(in_memory, IMAGE, "gradcam")
    _, scores, labels, _ = _by_hand(memory, prepared.tensor)
    by_score = [int(labels[i]) for i in torch.argsort(scores, descending=True, stable=True)]
    assert [d["label"] for d in explained.detections] == [names[i] for i in by_score]
    assert explained.target.label == names[explained.target.index] == names[by_score[0]]
    reloaded = load_model(_save(memory, tmp_path / "coco-style"))
    assert reloaded.labels == names and not any("left out" in note for note in reloaded.notes)
    again = attnexplain.explain(reloaded, IMAGE, "gradcam")
    assert [d["label"] for d in again.detections] == [d["label"] for d in explained.detections]


def _square_photos(folder: Path) -> list[Path]:
    """The two sample photos as 64-pixel squares: letterboxing a square into the model's square input
    changes nothing, so a photo pixel is a map pixel."""
    from PIL import Image

    folder.mkdir()
    paths = []
    for name in SAMPLES:
        Image.open(IMAGE.parent / name).convert("RGB").resize((SIDE, SIDE)).save(folder / name)
        paths.append(folder / name)
    return paths


def _quadrant_masks(masks: Path, photos: list[Path]) -> dict[str, np.ndarray]:
    """Per photo one mask per label (``MASKS/<image>/<label>.png``), each label its own quadrant:
    which one a metric read says which object's mask was used."""
    from PIL import Image

    quadrants = {}
    for index, label in LABELS.items():
        mask = np.zeros((SIDE, SIDE), dtype=bool)
        mask[
            (index // 2) * SIDE // 2 : (index // 2 + 1) * SIDE // 2,
            (index % 2) * SIDE // 2 : (index % 2 + 1) * SIDE // 2,
        ] = True
        quadrants[label] = mask
    for photo in photos:
        (masks / photo.stem).mkdir(parents=True)
        for label, mask in quadrants.items():
            Image.fromarray(mask.astype(np.uint8) * 255).save(masks / photo.stem / f"{label}.png")
    return quadrants


def _mass(heatmap: np.ndarray, mask: np.ndarray) -> float:
    positive = np.clip(heatmap, 0, None)
    return float(positive[mask].sum() / positive.sum())


@pytest.mark.heavy
def test_evaluate_a_detr_measures_each_explained_box_against_its_own_objects_mask(detr, tmp_path):
    folder, model = detr
    loaded = load_model(folder)
    photos = _square_photos(tmp_path / "photos")
    quadrants = _quadrant_masks(tmp_path / "masks", photos)
    detected = []
    for photo in photos:
        _, scores, labels, _ = _by_hand(model, prepare(load_image(photo).pixels, loaded.preprocessing).tensor)
        detected.append((scores, labels))
    label = LABELS[min(set(detected[0][1].tolist()) & set(detected[1][1].tolist()))]  # a class both images hold

    def evaluate(target: str, metrics: str, out: str):
        arguments = ["evaluate", str(folder), str(tmp_path / "photos"), "--masks", str(tmp_path / "masks")]
        options = ["--target", target, "--method", "chefer,gradcam", "--metrics", metrics, "--pointing-tolerance", "0"]
        return CliRunner().invoke(main, [*arguments, *options, "--out", str(tmp_path / out), "--quiet"])

    result = evaluate(label, "pointing,mass", "by-label")
    assert result.exit_code == 0, result.output
    images = {r["image"]: r for r in json.loads((tmp_path / "by-label" / "evaluation.json").read_text())["per_image"]}
    layer = loaded.plugin.default_layer(loaded.module)
    for photo in photos:
        batch = prepare(load_image(photo).pixels, loaded.preprocessing).tensor
        computed = compute_maps(loaded, batch, [METHODS["chefer"], METHODS["gradcam"]], [layer], target=label)
        record = images[photo.name]
        assert record["target"]["label"] == label
        for method in ("chefer", "gradcam"):
            heatmap = computed.maps[method][0].numpy()
            own, other = (
                _mass(heatmap, quadrants[label]),
                _mass(heatmap, quadrants[LABELS[(LABELS_INDEX[label] + 1) % 4]]),
            )
            assert record["metrics"][method]["mass"] == pytest.approx(own, abs=1e-5)
            assert own != pytest.approx(other, abs=1e-4)  # the label's own quadrant, not another's
            peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
            assert record["metrics"][method]["pointing"] == float(quadrants[label][peak])

    # box:N: its own label's mask, for the localisation metrics alone.
    result = evaluate("box:1", "mass", "by-box")
    assert result.exit_code == 0, result.output
    images = {r["image"]: r for r in json.loads((tmp_path / "by-box" / "evaluation.json").read_text())["per_image"]}
    for photo, (scores, labels) in zip(photos, detected):
        second = LABELS[int(labels[torch.argsort(scores, descending=True, stable=True)[1]])]
        batch = prepare(load_image(photo).pixels, loaded.preprocessing).tensor
        heatmap = compute_maps(loaded, batch, [METHODS["chefer"]], [], target="box:1").maps["chefer"][0].numpy()
        assert images[photo.name]["target"]["label"] == second
        assert images[photo.name]["metrics"]["chefer"]["mass"] == pytest.approx(
            _mass(heatmap, quadrants[second]), abs=1e-5
        )
    result = evaluate("box:1", "deletion,mass", "refused")
    assert result.exit_code != 0 and "box:1" in result.output and "--metrics pointing,mass,rank" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_batch_truth_on_a_detr_judges_its_top_class_and_writes_the_gallery(detr, tmp_path):
    folder, model = detr
    loaded = load_model(folder)
    photos = _square_photos(tmp_path / "photos")
    tops = []
    for photo in photos:
        _, scores, labels, _ = _by_hand(model, prepare(load_image(photo).pixels, loaded.preprocessing).tensor)
        tops.append(LABELS[int(labels[scores.argmax()])])
    wrong = next(label for label in LABELS.values() if label != tops[1])
    (tmp_path / "truth.csv").write_text(f"image,label\n{photos[0].name},{tops[0]}\n{photos[1].name},{wrong}\n")
    out = tmp_path / "gallery"
    arguments = ["batch", str(folder), str(tmp_path / "photos"), "--truth", str(tmp_path / "truth.csv")]
    result = CliRunner().invoke(main, [*arguments, "--method", "chefer,attention", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    truth = json.loads((out / "report.json").read_text())["truth"]
    assert (truth["judged"], truth["correct"], truth["accuracy"]) == (2, 1, 0.5)
    assert truth["confusion"][tops[0]][tops[0]] == 1 and sum(truth["confusion"][wrong].values()) == 1
    assert tops[0] not in truth["confusion"][wrong] or tops[0] == tops[1]
    records = {r["image"]: r for r in map(json.loads, (out / "results.jsonl").open())}
    for photo, top in zip(photos, tops):
        record = records[photo.name]
        assert record["target"]["label"] == top and sum(d["explained"] for d in record["detections"]) == 1
        assert (out / record["detail"]).is_file() and set(record["files"]) == {"chefer", "attention"}
    assert (out / "index.html").is_file()


def test_chefer_on_a_batch_gives_each_image_its_own_box_query(detr):
    folder, _ = detr
    loaded = load_model(folder)
    tensors = [prepare(load_image(IMAGE.parent / name).pixels, loaded.preprocessing).tensor for name in SAMPLES]
    together = compute_maps(loaded, torch.cat(tensors), [METHODS["chefer"]], [], target="box:1")
    for index, tensor in enumerate(tensors):
        alone = compute_maps(loaded, tensor, [METHODS["chefer"]], [], target="box:1")
        np.testing.assert_allclose(together.maps["chefer"][index].numpy(), alone.maps["chefer"][0].numpy(), atol=1e-6)
        assert int(together.targets[index]) == int(alone.targets[0])
