"""What an explanation costs, as a multiple of one bare inference forward on the same batch.

For each method: the median time of attnexplain's batch core (``compute_maps``: forward with capture,
backward down to the layer, maps at input resolution) divided by the median time of a bare
``torch.no_grad()`` forward of the same model on the same batch, measured in this one run. Beside it,
pytorch-grad-cam, torchcam and Captum on the same batch, layer and targets. Also the start-up time of
``attnexplain --help``. Run:

    .venv/bin/python benchmarks/methods_speed.py [--batch 8] [--repeats 5] [--sections swin,maxvit]

Sections ``newer`` and ``masking`` (issue #13) time the newer CAMs with paired ratios (bare forward and
method timed one after the other, median of the per-pair ratios), which a shared machine's load
affects less.

Goals (issue #4): each gradient CAM ≤ 1.2×, five gradient CAMs together ≤ 1.4×, rollout ≤ 1.3×
(also measured here for Swin-T and MaxViT-T, whose attention is recorded inside a function, and for a
detector's box-score target).

Sections ``legrad`` and ``attribution`` (issue #13; not in the default list, run them by name) time
LeGrad beside torchcam's, Captum's attributions through attnexplain beside Captum's own classes, and
RISE beside the masked forwards it needs; their ratios are paired (bare forward and method run
alternately, median of the per-pair ratios), for machines shared with other work.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from attnexplain.explanation import compute_maps, resolve_methods
from attnexplain.loading import LoadedModel
from attnexplain.plugins import select_plugin
from attnexplain.preprocess import Preprocessing, prepare

GRADIENT_CAMS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"]
PACKAGE_CLASSES = ["GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM"]


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def photos(count: int, size: int) -> torch.Tensor:
    from skimage import data

    sources = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    return torch.cat(
        [prepare(sources[i % len(sources)], Preprocessing(size=(size, size))).tensor for i in range(count)]
    )


def loaded_model(name: str, **kwargs) -> LoadedModel:
    torch.manual_seed(0)
    module = torchvision.models.get_model(name, **kwargs).eval().requires_grad_(False)
    return LoadedModel(module=module, source=name, loader="benchmark", architecture=name, plugin=select_plugin(module))


def model_and_batch(name: str, batch_size: int, size: int = 224, **kwargs):
    """The model, a batch of photos, its top-1 targets and its bare no-grad forward on that batch."""
    loaded = loaded_model(name, **kwargs)
    model, batch = loaded.module, photos(batch_size, size)
    with torch.no_grad():
        targets = model(batch).argmax(1)

    def bare():
        with torch.no_grad():
            model(batch)

    return loaded, batch, targets, bare


def verdict(ratio: float, goal: float | None) -> str:
    return "" if goal is None else (f"≤ {goal:.1f}×: " + ("met" if ratio <= goal else "MISSED"))


class Table:
    def __init__(self, forward_s: float) -> None:
        self.forward_s = forward_s
        print(f"bare forward: {forward_s * 1e3:.0f} ms\n")
        print("| who | what | median ms | ÷ bare forward | goal |")
        print("| --- | --- | ---: | ---: | --- |")

    def row(self, who: str, what: str, seconds: float, goal: float | None = None) -> None:
        ratio = seconds / self.forward_s
        print(f"| {who} | {what} | {seconds * 1e3:.0f} | {ratio:.2f}× | {verdict(ratio, goal)} |", flush=True)


def cnn_section(batch_size: int, repeats: int) -> None:
    import pytorch_grad_cam
    import torchcam.methods
    from captum.attr import LayerGradCam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    loaded, batch, targets, bare = model_and_batch("resnet50", batch_size)
    model = loaded.module
    print(f"\n### resnet50, batch {batch_size} at 224×224, layer4\n")
    table = Table(median_seconds(bare, repeats))
    for name in GRADIENT_CAMS + ["eigencam"]:
        methods = resolve_methods(loaded, name)
        table.row(
            "attnexplain",
            name,
            median_seconds(lambda: compute_maps(loaded, batch, methods, ["layer4"]), repeats),
            goal=1.2 if name in GRADIENT_CAMS else None,
        )
    methods = resolve_methods(loaded, ",".join(GRADIENT_CAMS))
    table.row(
        "attnexplain",
        "the five gradient CAMs together",
        median_seconds(lambda: compute_maps(loaded, batch, methods, ["layer4"]), repeats),
        goal=1.4,
    )

    package_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    model.requires_grad_(True)  # pytorch-grad-cam and torchcam backpropagate through the parameters
    cams = [getattr(pytorch_grad_cam, c)(model=model, target_layers=[model.layer4]) for c in PACKAGE_CLASSES]
    for name, cam in zip(GRADIENT_CAMS, cams):
        table.row(
            "pytorch-grad-cam", name, median_seconds(lambda: cam(input_tensor=batch, targets=package_targets), repeats)
        )

    def five():
        for cam in cams:
            cam(input_tensor=batch, targets=package_targets)

    table.row("pytorch-grad-cam", "the five, one after another", median_seconds(five, repeats))
    for cam in cams:
        cam.activations_and_grads.release()
    for name, class_name in (("gradcam", "GradCAM"), ("layercam", "LayerCAM")):
        extractor = getattr(torchcam.methods, class_name)(model, target_layer="layer4")

        def run_torchcam():
            extractor(targets.tolist(), model(batch))

        table.row("torchcam", name, median_seconds(run_torchcam, repeats))
        extractor.remove_hooks()
    model.requires_grad_(False)
    captum_cam = LayerGradCam(model, model.layer4)
    table.row(
        "captum",
        "gradcam (LayerGradCam)",
        median_seconds(lambda: captum_cam.attribute(batch, target=targets.tolist()), repeats),
    )


def paired_ratio(bare, function, repeats: int) -> tuple[float, float]:
    """Median of per-pair ratios (method ÷ bare forward, timed one after the other), and the median
    method time: on a shared machine the pairs see the same load, where separate medians do not."""
    bare()
    function()  # warm-up
    ratios, times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        bare()
        bare_s = time.perf_counter() - started
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
        ratios.append(times[-1] / bare_s)
    return statistics.median(ratios), statistics.median(times)


def paired_row(who: str, what: str, ratio_and_seconds: tuple[float, float], goal: float | None = None) -> None:
    ratio, seconds = ratio_and_seconds
    print(f"| {who} | {what} | {seconds * 1e3:.0f} | {ratio:.2f}× | {verdict(ratio, goal)} |", flush=True)


#: Issue #13's CAMs from the shared pass, and pytorch-grad-cam's class for each.
NEWER_CAMS = {
    "gradcam_elementwise": "GradCAMElementWise",
    "eigengradcam": "EigenGradCAM",
    "kpcacam": "KPCA_CAM",
    "finercam": "FinerCAM",
    "shapleycam": "ShapleyCAM",
    "randomcam": "RandomCAM",
    "fullgrad": "FullGrad",
    "smoothgradcampp": None,
}
SHARED_PASS = ("gradcam_elementwise", "eigengradcam", "kpcacam", "finercam", "randomcam")


def newer_cams_section(batch_size: int, repeats: int) -> None:
    """Issue #13's CAMs on resnet50 (paired ratios), beside pytorch-grad-cam and torchcam."""
    import pytorch_grad_cam
    import torchcam.methods
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from attnexplain.explanation import MethodOptions

    loaded, batch, targets, bare = model_and_batch("resnet50", batch_size, 224)
    model = loaded.module

    smooth = MethodOptions(samples=4)  # torchcam's default number of samples
    print(f"\n### Issue #13's CAMs: resnet50, batch {batch_size} at 224×224, layer4; paired ratios\n")
    print("| who | what | median ms | ÷ bare forward (median of pairs) | goal |")
    print("| --- | --- | ---: | ---: | --- |")
    for name in NEWER_CAMS:
        methods = resolve_methods(loaded, name)
        layers = [] if name == "fullgrad" else ["layer4"]
        options = smooth if name == "smoothgradcampp" else None
        paired_row(
            "attnexplain",
            name,
            paired_ratio(bare, lambda: compute_maps(loaded, batch, methods, layers, options=options), repeats),
            goal=1.2 if name in SHARED_PASS else None,
        )
    methods = resolve_methods(loaded, ",".join(SHARED_PASS))
    paired_row(
        "attnexplain",
        "the five shared-pass CAMs together",
        paired_ratio(bare, lambda: compute_maps(loaded, batch, methods, ["layer4"]), repeats),
        goal=1.4,
    )
    package_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    model.requires_grad_(True)
    for name, class_name in NEWER_CAMS.items():
        if class_name is None:
            continue
        layers = [] if name == "fullgrad" else [model.layer4]  # FullGrad takes every biased layer
        cam = getattr(pytorch_grad_cam, class_name)(model=model, target_layers=layers)
        if name == "finercam":
            run = lambda: cam(input_tensor=batch, targets=None)  # noqa: E731 - the top class vs its neighbours
        else:
            run = lambda: cam(input_tensor=batch, targets=package_targets)  # noqa: E731
        paired_row("pytorch-grad-cam", name, paired_ratio(bare, run, repeats))
        getattr(cam, "base_cam", cam).activations_and_grads.release()
    extractor = torchcam.methods.SmoothGradCAMpp(model, target_layer="layer4", num_samples=4)

    def run_torchcam():
        extractor(targets.tolist(), model(batch))

    paired_row("torchcam", "smoothgradcampp", paired_ratio(bare, run_torchcam, repeats))
    extractor.remove_hooks()
    model.requires_grad_(False)


def masking_cams_section(repeats: int) -> None:
    """Ablation-CAM, SS-CAM and IS-CAM cost forwards per channel: resnet18, one image at 112×112,
    layer4 (512 channels), 2 samples for SS-CAM and IS-CAM; beside pytorch-grad-cam and torchcam."""
    import pytorch_grad_cam
    import torchcam.methods
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from attnexplain.explanation import MethodOptions

    loaded, batch, targets, bare = model_and_batch("resnet18", 1, 112)
    model, target = loaded.module, int(targets[0])

    options = MethodOptions(samples=2, batch_size=64)
    print("\n### Ablation-CAM, SS-CAM, IS-CAM: resnet18, 1 image at 112×112, layer4 (512 channels); paired ratios\n")
    print("| who | what | median ms | ÷ bare forward (median of pairs) | forwards needed |")
    print("| --- | --- | ---: | ---: | --- |")
    for name, needed in (("ablationcam", "512 above layer4"), ("sscam", "2 × 512"), ("iscam", "2 × 512")):
        methods = resolve_methods(loaded, name)
        ratio, seconds = paired_ratio(
            bare, lambda: compute_maps(loaded, batch, methods, ["layer4"], options=options), repeats
        )
        print(f"| attnexplain | {name} | {seconds * 1e3:.0f} | {ratio:.1f}× | {needed} |", flush=True)
    model.requires_grad_(True)
    ablation = pytorch_grad_cam.AblationCAM(model=model, target_layers=[model.layer4], batch_size=64)
    ratio, seconds = paired_ratio(
        bare, lambda: ablation(input_tensor=batch, targets=[ClassifierOutputTarget(target)]), repeats
    )
    print(f"| pytorch-grad-cam | ablationcam | {seconds * 1e3:.0f} | {ratio:.1f}× | 512 whole |", flush=True)
    ablation.activations_and_grads.release()
    for name, class_name in (("sscam", "SSCAM"), ("iscam", "ISCAM")):
        extractor = getattr(torchcam.methods, class_name)(
            model, target_layer="layer4", batch_size=64, num_samples=2, input_shape=(3, 112, 112)
        )

        def run_torchcam():
            with torch.no_grad():
                output = model(batch)
            extractor(target, output)

        ratio, seconds = paired_ratio(bare, run_torchcam, repeats)
        print(f"| torchcam | {name} | {seconds * 1e3:.0f} | {ratio:.1f}× | 2 × 512 |", flush=True)
        extractor.remove_hooks()
    model.requires_grad_(False)


def transformer_section(name: str, batch_size: int, repeats: int) -> None:
    loaded = loaded_model(name)
    model, batch = loaded.module, photos(batch_size, 224)

    def bare():
        with torch.no_grad():
            model(batch)

    kind = (
        "the bare forward uses PyTorch's fused attention"
        if name.startswith("vit")
        else "windowed attention, recorded inside the attention function"
    )
    print(f"\n### {name}, batch {batch_size} at 224×224 ({kind})\n")
    table = Table(median_seconds(bare, repeats))
    for methods_name, goal in (("rollout", 1.3), ("attention", None), ("rollout,attention", None), ("chefer", None)):
        methods = resolve_methods(loaded, methods_name)
        table.row(
            "attnexplain",
            methods_name,
            median_seconds(lambda: compute_maps(loaded, batch, methods, []), repeats),
            goal=goal,
        )


def detection_section(batch_size: int, repeats: int) -> None:
    """A detector at the size it resizes to itself (800): LayerCAM of the top box's score."""
    # Random weights, nothing downloaded; every box kept, so that random weights still detect.
    loaded = loaded_model("fasterrcnn_resnet50_fpn", weights_backbone=None, box_score_thresh=0.0)
    loaded.preprocessing = loaded.plugin.preprocessing(loaded.module)
    model = loaded.module
    sources = photos(batch_size, 800)
    # The detector normalises inside: give it [0, 1] pixels, as its preprocessing does.
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    batch = sources * std + mean

    def bare():
        with torch.no_grad():
            model(batch)

    layer = loaded.plugin.default_layer(model)
    print(f"\n### fasterrcnn_resnet50_fpn, batch {batch_size} at 800×800, {layer}\n")
    table = Table(median_seconds(bare, repeats))
    for name in ("layercam", "gradcam,layercam,hirescam"):
        methods = resolve_methods(loaded, name)
        table.row(
            "attnexplain",
            name,
            median_seconds(lambda: compute_maps(loaded, batch, methods, [layer]), repeats),
            goal=1.2,
        )


def timed_row(who: str, what: str, bare, method, repeats: int, note: str = "") -> None:
    ratio, seconds = paired_ratio(bare, method, repeats)
    print(f"| {who} | {what} | {seconds * 1e3:.0f} | {ratio:.2f}× | {note} |", flush=True)


PAIRED_HEADER = "| who | what | median ms | ÷ bare forward (paired) | note |\n| --- | --- | ---: | ---: | --- |"


def attribution_section(batch_size: int, repeats: int, samples: int = 32) -> None:
    """Captum's attributions through attnexplain beside Captum's own classes, on a ResNet-18 (a VGG-11
    for DeepLIFT and LRP, which refuse ResNet's shared ReLU), and RISE against the forwards it needs."""
    import captum.attr as captum

    from attnexplain.methods.attribution import NOISE_SEED, superpixels
    from attnexplain.methods.rise import rise_masks

    chunk = 32
    for name in ("resnet18", "vgg11"):
        loaded, batch, targets, bare = model_and_batch(name, batch_size, num_classes=10)
        model, targets = loaded.module, targets.tolist()
        print(f"\n### {name} (10 classes), batch {batch_size} at 224×224: attributions\n")
        print(PAIRED_HEADER)
        ours = (
            ["deeplift", "lrp"]
            if name == "vgg11"
            else [
                "input_x_gradient",
                "guided_backprop",
                "deconvolution",
                "gradientshap",
                "feature_ablation",
                "kernelshap",
                "lime",
                "rise",
            ]
        )
        from attnexplain.explanation import MethodOptions

        for method in ours:
            methods = resolve_methods(loaded, method)
            options = MethodOptions(samples=samples, batch_size=chunk)
            timed_row(
                "attnexplain",
                method,
                bare,
                lambda: compute_maps(loaded, batch, methods, [], targets=torch.tensor(targets), options=options),
                repeats,
                f"--samples {samples}" if method in ("gradientshap", "kernelshap", "lime", "rise") else "",
            )
        leaf = lambda: batch.clone().requires_grad_(True)
        if name == "vgg11":
            peers = {
                "deeplift": lambda: captum.DeepLift(model).attribute(leaf(), target=targets),
                "lrp": lambda: captum.LRP(model).attribute(leaf(), target=targets),
            }
        else:
            masks = superpixels(batch)

            def per_image(explainer, **kwargs):
                def run():
                    for index, target in enumerate(targets):
                        torch.manual_seed(NOISE_SEED)
                        explainer.attribute(
                            batch[index : index + 1],
                            target=target,
                            feature_mask=masks[index : index + 1],
                            perturbations_per_eval=chunk,
                            **kwargs,
                        )

                return run

            peers = {
                "input_x_gradient": lambda: captum.InputXGradient(model).attribute(leaf(), target=targets),
                "guided_backprop": lambda: captum.GuidedBackprop(model).attribute(leaf(), target=targets),
                "deconvolution": lambda: captum.Deconvolution(model).attribute(leaf(), target=targets),
                "gradientshap": lambda: captum.GradientShap(model).attribute(
                    leaf(), baselines=torch.zeros_like(batch), n_samples=samples, target=targets
                ),
                "feature_ablation (same superpixels)": per_image(captum.FeatureAblation(model)),
                "kernelshap (same superpixels)": per_image(captum.KernelShap(model), n_samples=samples),
                "lime (same superpixels)": per_image(captum.Lime(model), n_samples=samples),
            }
        for what, run in peers.items():
            timed_row("captum", what, bare, run, repeats)
        if name == "resnet18":
            # What RISE cannot do without: samples × batch masked images, forwarded chunk at a time.
            masked = batch[:1] * rise_masks(chunk, tuple(batch.shape[-2:]))[:, None]

            def needed_forwards():
                with torch.no_grad():
                    for _ in range(samples * batch_size // chunk):
                        torch.softmax(model(masked), dim=1)

            timed_row(
                "reference",
                f"the {samples * batch_size} masked forwards RISE needs ({chunk} per pass)",
                bare,
                needed_forwards,
                repeats,
            )


def legrad_section(batch_size: int, repeats: int) -> None:
    """LeGrad on ViT-B/16, every block, beside torchcam's LeGrad on the same blocks and targets."""
    import torchcam.methods

    loaded, batch, targets, bare = model_and_batch("vit_b_16", batch_size)
    model = loaded.module
    print(f"\n### vit_b_16, batch {batch_size} at 224×224: LeGrad (all 12 blocks)\n")
    print(PAIRED_HEADER)
    methods = resolve_methods(loaded, "legrad")
    timed_row("attnexplain", "legrad", bare, lambda: compute_maps(loaded, batch, methods, [], targets=targets), repeats)

    def run_torchcam():  # its hooks refuse the no-grad bare forward: present only during its own
        with torchcam.methods.LeGrad(model, list(model.encoder.layers)) as extractor, torch.enable_grad():
            extractor(targets.tolist(), model(batch))

    timed_row("torchcam", "LeGrad", bare, run_torchcam, repeats)


def startup_section() -> None:
    cli = [str(Path(sys.executable).with_name("attnexplain")), "--help"]
    seconds = median_seconds(lambda: subprocess.run(cli, capture_output=True, check=True), 10)
    print(f"\n`attnexplain --help`: {seconds * 1e3:.0f} ms (median of 10 runs, whole process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--samples", type=int, default=32, help="attribution: masks, noisy copies or perturbations per image"
    )
    parser.add_argument(
        "--sections",
        default="cnn,newer,masking,vit,swin,maxvit,detection,startup",
        help="comma-separated: cnn, newer, masking, vit, swin, maxvit, detection, startup, "
        "attribution, legrad (the last two: not in the default)",
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, numpy {np.__version__}, CPU"
    )
    sections = {
        "cnn": lambda: cnn_section(args.batch, args.repeats),
        "vit": lambda: transformer_section("vit_b_16", args.batch, args.repeats),
        "swin": lambda: transformer_section("swin_t", args.batch, args.repeats),
        "maxvit": lambda: transformer_section("maxvit_t", args.batch, args.repeats),
        "detection": lambda: detection_section(max(1, args.batch // 4), args.repeats),
        "startup": startup_section,
        "attribution": lambda: attribution_section(max(1, args.batch // 4), args.repeats, args.samples),
        "legrad": lambda: legrad_section(max(1, args.batch // 4), args.repeats),
        "newer": lambda: newer_cams_section(args.batch, args.repeats),
        "masking": lambda: masking_cams_section(args.repeats),
    }
    for name in args.sections.split(","):
        sections[name.strip()]()


if __name__ == "__main__":
    main()
