"""File formats and names of the outputs, importable without NumPy or OpenCV (the CLI's options
list them; the batch, gallery and report writers share the names)."""

#: Overlay file formats: PNG is exact; JPEG (quality 90) is ~10× faster to encode and ~10× smaller
#: for photos, which is what a batch of thousands of images wants (the raw maps stay in .npy files).
OVERLAY_FORMATS = ("png", "jpg")

#: The colormaps of written pictures and of the pages (OpenCV's), perceptually uniform ones first:
#: jet's bright cyan and yellow bands read as edges that are not in the map, and its blue tints a
#: whole photo.
COLORMAP_NAMES = ("turbo", "inferno", "viridis", "magma", "jet")
DEFAULT_COLORMAP = "turbo"

#: A batch's output folder: one line per image, the spreadsheet, the batch report and its gallery.
RESULTS_JSONL = "results.jsonl"
SUMMARY_CSV = "summary.csv"
REPORT_JSON = "report.json"  # also one image's report
INDEX_HTML = "index.html"
REPORT_HTML = "report.html"  # one image's page
