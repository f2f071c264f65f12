"""Open a bundle, index a gallery and search it, in a process where the torch side cannot be imported.

Run as a script (``python search_without_torch.py BUNDLE FEATURES.npy CAPTIONS.txt OUT``) by
tests/test_bundle_traits.py (torch side blocked in the test's venv) and tests/test_base_install.py (a venv with
only ``pip install .``). Prints one JSON line: the top-3 images per caption, the scores, and any torch-side
module that got imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TORCH_SIDE = ("torch", "itmrt.families", "itmrt.models", "itmrt.graphs", "itmrt.export", "itmrt.train")


def main(bundle: str, features_file: str, captions_file: str, out: str) -> None:
    import numpy as np

    from itmrt.runtime import load

    runtime = load(bundle, threads=1)
    gallery = runtime.index(np.load(features_file), Path(out) / "gallery")
    captions = Path(captions_file).read_text().splitlines()
    top = runtime.search_text_to_image(captions, runtime.open_gallery(Path(out) / "gallery"), k=3)
    imported = sorted(m for m in sys.modules if m.startswith(TORCH_SIDE) and sys.modules[m] is not None)
    import itmrt

    print(json.dumps({"itmrt": itmrt.__file__, "top3": top.indices.tolist(), "scores": top.scores.tolist(),
                      "images": len(gallery), "traits": runtime.traits.to_json(), "torch_side_imported": imported}))


if __name__ == "__main__":
    if "--block-torch-side" in sys.argv:
        sys.argv.remove("--block-torch-side")
        for name in TORCH_SIDE:
            sys.modules[name] = None  # type: ignore[assignment]  # an import of it raises ImportError
    main(*sys.argv[1:])
