"""File formats of the outputs, importable without NumPy or OpenCV (the CLI's options list them)."""

#: Overlay file formats: PNG is exact; JPEG (quality 90) is ~10× faster to encode and ~10× smaller
#: for photos, which is what a batch of thousands of images wants (the raw maps stay in .npy files).
OVERLAY_FORMATS = ("png", "jpg")
