"""``masm serve`` with a whole-image detector (issue 30): an upload is scored as ``masm detect`` scores the
same file (centre crop without resize, tiles), with no face search."""

from __future__ import annotations

import json

import pytest

from masm.models import save_checkpoint
from test_whole_image import trained_whole, write_pngs


@pytest.mark.parametrize("test", ["center_crop", "tiles"])
def test_an_upload_is_scored_as_detect_scores_the_file(tmp_path, test):
    from fastapi.testclient import TestClient

    from masm.cli.main import main
    from masm.serve import ServeOptions, create_app

    checkpoint = save_checkpoint(trained_whole(test), tmp_path / "ckpt")
    paths = write_pngs(tmp_path / "images")
    out = tmp_path / "detect.jsonl"
    assert main(["detect", str(checkpoint), *map(str, paths), "--out", str(out)]) == 0
    detect = {r["input"]: r for r in map(json.loads, out.read_text().splitlines())}
    with TestClient(create_app(checkpoint, ServeOptions())) as client:
        assert client.get("/v1/model").json()["faces"] is False  # a whole-image detector looks for none
        for path in paths:
            answer = client.post("/v1/detect", files={"file": (path.name, path.read_bytes())}).json()
            expected = detect[str(path)]
            assert answer["faces"] is None and answer["frames"] == 1 and answer["error"] is None
            assert answer["score"] == pytest.approx(expected["score"], abs=1e-6)
            assert answer["label"] == expected["label"]
