"""A model whose preprocessing nothing says (a state_dict loaded with --arch) sees a photo as it was
trained to: torchvision's ImageNet evaluation transform (shorter side to 256, the centre 224
cropped), the report's picture and box that crop; `--resize squash` stretches the whole photo."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from attnexplain.cli import main
from attnexplain.model_spec import ModelSpec

#: One grey level after ImageNet normalisation (the smallest std): the 8-bit resize attnexplain
#: uses and Pillow's may round a value apart (see attnexplain.preprocess.Preprocessing).
ONE_LEVEL = 1 / 255 / 0.224 + 1e-6


@pytest.fixture(scope="module")
def wide_photo(tmp_path_factory):
    """Chelsea the cat, 451×300 (width × height), as a PNG: decoded alike by every reader."""
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "chelsea-451x300.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


def _torchvision_input(path, resize) -> tuple[np.ndarray, tuple[int, int]]:
    """What torchvision's own transforms make of the photo, and the size it was resized to."""
    from PIL import Image
    from torchvision import transforms

    image = Image.open(path).convert("RGB")
    resized = transforms.Resize(resize)(image)
    crop = transforms.CenterCrop(224)(resized)
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return normalize(transforms.ToTensor()(crop)).numpy(), resized.size


def _model_input(spec: ModelSpec, photo):
    """The input the model is run on by ``explain``, and the explanation."""
    import attnexplain

    loaded = spec.load()
    seen = []
    handle = loaded.module.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        result = attnexplain.explain(loaded, photo, "gradcam")
    finally:
        handle.remove()
    real = [batch for batch in seen if batch.device.type != "meta"]  # the layer probe's are shapes only
    return real[0][0].numpy(), result


def _close(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    difference = np.abs(ours - reference)
    assert difference.max() <= ONE_LEVEL and (difference > 1e-5).mean() < 0.01


def test_without_known_preprocessing_the_centre_crop_is_explained(resnet_state_dict_file, wide_photo):
    ours, result = _model_input(ModelSpec(str(resnet_state_dict_file), arch="resnet18"), wide_photo)
    reference, (resized_w, resized_h) = _torchvision_input(wide_photo, 256)
    _close(ours, reference)
    # The box is the crop, in the photo's pixels: 224×224 out of the 384×256 resize.
    left, top = round((resized_w - 224) / 2), round((resized_h - 224) / 2)
    sx, sy = resized_w / 451, resized_h / 300
    assert result.box == pytest.approx((left / sx, top / sy, (left + 224) / sx, (top + 224) / sy))
    assert result.preprocessing.resize == 256 and result.preprocessing.size == (224, 224)


def test_a_module_handed_in_memory_keeps_the_whole_photo(small_resnet, wide_photo):
    import attnexplain

    assert attnexplain.explain(small_resnet, wide_photo, "gradcam").box == (0.0, 0.0, 451.0, 300.0)


def test_resize_squash_stretches_the_whole_photo_as_before(resnet_state_dict_file, wide_photo):
    spec = ModelSpec(str(resnet_state_dict_file), arch="resnet18", resize="squash")
    ours, result = _model_input(spec, wide_photo)
    reference, _ = _torchvision_input(wide_photo, (224, 224))
    _close(ours, reference)
    assert result.box == (0.0, 0.0, 451.0, 300.0)


def test_the_report_says_and_shows_the_crop(resnet_state_dict_file, wide_photo, tmp_path):
    def run(*extra: str) -> tuple[dict, str]:
        out = tmp_path / "-".join(extra or ("default",))
        arguments = [
            "run",
            str(resnet_state_dict_file),
            str(wide_photo),
            "--arch",
            "resnet18",
            "--method",
            "gradcam",
            *extra,
            "--out",
            str(out),
        ]
        done = CliRunner().invoke(main, arguments)
        assert done.exit_code == 0, done.output
        written = out / "chelsea-451x300"
        return json.loads((written / "report.json").read_text()), (written / "report.html").read_text()

    report, page = run()
    assert report["preprocessing"]["size"] == [224, 224] and report["preprocessing"]["resize"] == 256
    assert report["preprocessing"]["source"] == "default: torchvision's ImageNet evaluation transform"
    assert "shorter side resized to 256, then the centre 224×224 cropped" in page
    squashed, page = run("--resize", "squash")
    assert squashed["preprocessing"]["resize"] is None
    assert squashed["preprocessing"]["source"].endswith("+ --resize squash")
    assert "resized to 224×224 (height × width), the whole photo" in page
    # A smaller input keeps torchvision's ratio: the shorter side to 256 × 160/224.
    smaller, _ = run("--size", "160")
    assert smaller["preprocessing"]["size"] == [160, 160] and smaller["preprocessing"]["resize"] == 183


def test_resize_crop_leaves_a_known_crop_alone_and_crops_a_squash():
    from attnexplain.preprocess import DEFAULT_PREPROCESSING, Preprocessing

    assert DEFAULT_PREPROCESSING.with_resize("crop") is DEFAULT_PREPROCESSING
    known = Preprocessing(size=(384, 384), resize=438, source="weights")
    assert known.with_resize("crop") is known
    squashed = Preprocessing(size=(112, 112), source="checkpoint")
    assert squashed.with_resize("crop").resize == 128
    assert squashed.with_resize("squash") is squashed
    assert known.with_resize("squash").resize is None


def test_the_run_header_says_which_maps_explain_the_class(sample_vit_file, tmp_path):
    """rollout's map is the same whatever the class (checked), so the header does not say it
    explains one; chefer's depends on it."""
    import attnexplain

    image = sample_vit_file.parents[1] / "images" / "cat-on-grass.png"
    first, second = (attnexplain.explain(str(sample_vit_file), image, "rollout,chefer", target=t) for t in (0, 1))
    np.testing.assert_array_equal(first.maps["rollout"].heatmap, second.maps["rollout"].heatmap)
    assert not np.allclose(first.maps["chefer"].heatmap, second.maps["chefer"].heatmap)

    def header(methods: str) -> str:
        arguments = ["run", str(sample_vit_file), str(image), "--method", methods, "--out", str(tmp_path / methods)]
        done = CliRunner().invoke(main, arguments, env={"COLUMNS": "200"})
        assert done.exit_code == 0, done.output
        return next(line for line in done.stdout.splitlines() if line.startswith(("Explained", "Mapped")))

    assert header("rollout") == "Mapped rollout: not class-specific (the same map for every class)."
    label = first.predictions[0].label  # the class explained by default: the top prediction
    assert header("chefer,rollout") == f"Explained class {label} with chefer; rollout not class-specific."
