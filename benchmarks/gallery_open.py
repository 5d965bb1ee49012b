"""What the interactive pages cost: a batch's per-image detail page with its embedded maps and photo,
and opening the gallery of a 10,000-image run in a browser.

    python benchmarks/gallery_open.py [--images 10000] [--repeats 15]

Prints (1) the paired ratio of writing one image's detail page with its interactive maps
(``viewer_data`` + photo.jpg + the page) to writing the page without them (the page batch wrote
before issue #12), on the sample ViT's maps of a 512-pixel photo: median of the per-pair ratios,
the two alternating; (2) the seconds ``write_reports`` takes for --images synthetic records
(index.html, gallery-data.js, report.json, summary.csv); (3) the milliseconds Debian's chromium
takes to open that gallery from disk until its first page of cards is drawn (goal: < 2000 ms), and
the size of gallery-data.js.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def detail_page_ratio(repeats: int) -> tuple[float, float, float]:
    import attnexplain
    from attnexplain.gallery import render_detail
    from attnexplain.render import downscale, encode_image
    from attnexplain.viewer import DETAIL_MAP_SIDE, viewer_data

    photo = attnexplain.load_image(REPO / "samples" / "images" / "chelsea.jpg").pixels
    explanation = attnexplain.explain(
        str(REPO / "samples" / "models" / "vit-composites.pt"), photo, "rollout,attention"
    )
    record = {
        "image": "a/chelsea.jpg",
        "output": "images/a/chelsea.jpg",
        "methods": list(explanation.maps),
        "target": explanation.target.as_dict(),
        "predictions": [p.as_dict() for p in explanation.predictions],
        "files": {
            name: {"overlay": f"overlay-{name}.jpg", "heatmap": f"heatmap-{name}.npy"} for name in explanation.maps
        },
        "maps": {name: {"layers": []} for name in explanation.maps},
        "timings": {},
    }

    def bare() -> None:
        render_detail(record)

    def interactive() -> None:
        encode_image(downscale(photo, 512), ".jpg", quality=85)
        render_detail(
            record,
            viewer_data(
                explanation.maps, "cat", explanation.box, explanation.image.size, DETAIL_MAP_SIDE, "turbo", 0.5
            ),
            "photo.jpg",
        )

    ratios, bare_s, interactive_s = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        bare()
        middle = time.perf_counter()
        interactive()
        ended = time.perf_counter()
        bare_s.append(middle - started)
        interactive_s.append(ended - middle)
        ratios.append((ended - middle) / (middle - started))
    return statistics.median(ratios), statistics.median(bare_s), statistics.median(interactive_s)


def synthetic_records(count: int) -> list[dict]:
    return [
        {
            "image": f"class-{i % 7}/img{i:05d}.jpg",
            "status": "ok",
            "output": f"images/class-{i % 7}/img{i:05d}.jpg",
            "detail": f"images/class-{i % 7}/img{i:05d}.jpg/detail.html",
            "photo": "photo.jpg",
            "files": {"gradcam": {"overlay": "overlay-gradcam.jpg", "thumb": "thumb-gradcam.jpg"}},
            "methods": ["gradcam"],
            "truth": f"c{i % 7}",
            "predictions": [{"index": i % 5, "label": f"c{i % 5}", "prob": (i % 997) / 997}],
            "target": {"index": i % 5, "label": f"c{i % 5}", "prob": (i % 997) / 997},
        }
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    from attnexplain.gallery import write_reports

    ratio, bare_s, interactive_s = detail_page_ratio(args.repeats)
    print(
        f"detail page: interactive {interactive_s * 1000:.1f} ms vs bare {bare_s * 1000:.1f} ms "
        f"(median of {args.repeats} paired ratios: {ratio:.2f}x)"
    )
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        records = synthetic_records(args.images)
        started = time.perf_counter()
        write_reports(out, records, {"methods": ["gradcam"], "complete": True})
        print(
            f"write_reports for {args.images} records: {time.perf_counter() - started:.2f} s; "
            f"gallery-data.js {(out / 'gallery-data.js').stat().st_size / 2**20:.2f} MiB"
        )
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            print("no chromium: the opening time is not measured")
            return
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            times = []
            for _ in range(5):
                page = browser.new_page()
                page.goto((out / "index.html").as_uri())
                page.wait_for_function("document.querySelectorAll('.card').length > 0")
                times.append(page.evaluate("performance.now()"))
                page.close()
            browser.close()
        print(
            f"gallery of {args.images} images opened in {statistics.median(times):.0f} ms (median of 5; goal < 2000 ms)"
        )


if __name__ == "__main__":
    main()
