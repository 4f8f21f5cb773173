"""Files of the input folders that are not read are listed, with why, in the summary and the
manifest (a compressed file or a dangling symlink used to vanish without a word)."""

from __future__ import annotations

import json

from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.publish import MANIFEST


def test_skipped_inputs_are_in_the_manifest_and_the_summary(mixed):
    manifest = json.loads((OutputLayout(mixed["out"]).data_dir(0) / MANIFEST).read_text())
    reasons = {
        entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in manifest["skipped_inputs"]
    }
    assert reasons["notes.txt"].startswith("unsupported file type")
    assert reasons["moved.jsonl"].startswith("dangling symlink")
    assert reasons["_SUCCESS"].startswith("hidden name")
    output = " ".join(mixed["output"].split())  # the summary, as one line
    assert "not an input, skipped:" in output and "notes.txt: unsupported file type" in output
    assert "moved.jsonl: dangling symlink" in output
    assert "1 hidden metadata file(s)" in output
