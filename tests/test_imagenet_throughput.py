"""benchmarks/imagenet_throughput.py writes its .beton the way ffcv-imagenet writes ImageNet (the whole benchmark's
smoke run is one of the README's commands, run in tests/test_readme_commands.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("SBSAMPLER_REQUIRE_FFCV") != "1":
    pytest.importorskip("ffcv")

# benchmarks/ (and the examples the benchmark puts there) stay on sys.path only while it is imported (test_demo.py)
_saved = list(sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
try:
    import imagenet_throughput as it  # noqa: E402
finally:
    sys.path[:] = _saved


def test_the_synthetic_beton_is_written_as_ffcv_imagenet_writes_imagenet(tmp_path):
    """write_imagenet.sh 500 0.50 90: longer side at most 500, half the images JPEG (quality 90), 1000 classes."""
    from ffcv.reader import Reader

    data = it.ImageNetLike(200, max_side=500)
    img, label = data[3]
    assert img.dtype == np.uint8 and img.shape[2] == 3 and 250 <= min(img.shape[:2]) and max(img.shape[:2]) <= 500
    assert [data[i][1] for i in range(5)] == [data[i][1] for i in range(5)]  # a function of the index
    labels = {data[i][1] for i in range(200)}
    assert max(labels) < 1000 and len(labels) > 150
    path = tmp_path / "imagenet_like.beton"
    it.write_imagenet_like(path, 200, 500, workers=2)
    reader = Reader(str(path))
    assert reader.num_samples == 200 and reader.field_names == ["image", "label", "index"]
    meta = reader.metadata["f0"]
    jpeg = float((meta["mode"] == 1).mean())  # FFCV's RGBImageField: 0 raw, 1 JPEG
    assert 0.35 < jpeg < 0.65
    assert int(np.maximum(meta["width"], meta["height"]).max()) <= 500
