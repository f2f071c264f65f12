"""The results formats: ``results.jsonl``, as ``itmrt infer`` writes it and ``itmrt query`` prints it.

One JSON object a line. A caption query: ``{"query": "caption", "index", "caption", "images", "scores"}``
(and ``"image_ids"`` where the images came from files or the gallery names them); an image query:
``{"query": "image", "index", "captions", "scores"}`` (and ``"image_id"``). Images are gallery rows,
captions positions in the captions file, both numbered from 0; scores run from best to worst.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["caption_result_lines", "results_jsonl"]


def caption_result_lines(captions: list[str], t2i: Any, start: int = 0, ids: Any = None) -> list[str]:
    """One JSON line per caption query with its best images (caption ``j`` numbered ``start + j``).

    ``ids``: per caption, its result images' ids (``image_ids``), where the images came from files.
    ``itmrt query`` prints the same lines from a service's answers.
    """
    lines = []
    for j, caption in enumerate(captions):
        line: dict[str, Any] = {"query": "caption", "index": start + j, "caption": caption,
                                "images": [int(x) for x in t2i.indices[j]]}
        if ids is not None:
            line["image_ids"] = [str(x) for x in ids[j]]
        lines.append(json.dumps({**line, "scores": [float(s) for s in t2i.scores[j]]}, ensure_ascii=False))
    return lines


def results_jsonl(captions: list[str], t2i: Any, i2t: Any, image_ids: list[str] | None = None) -> str:
    """One JSON line per caption query (best images) then per image query (best captions); ``t2i`` or ``i2t``
    None: that direction's lines left out (``itmrt infer --direction``).

    Images are given by index (``images``, ``index``) and, when they came from
    image files, also by id (``image_ids``, ``image_id``: the path as listed).
    """
    lines: list[str] = []
    if t2i is not None:
        result_ids = None if image_ids is None else [[image_ids[int(x)] for x in row] for row in t2i.indices]
        lines = caption_result_lines(captions, t2i, ids=result_ids)
    for i in range(0 if i2t is None else i2t.indices.shape[0]):
        line: dict[str, Any] = {"query": "image", "index": i}
        if image_ids is not None:
            line["image_id"] = image_ids[i]
        lines.append(json.dumps({**line, "captions": [int(x) for x in i2t.indices[i]],
                                 "scores": [float(s) for s in i2t.scores[i]]}, ensure_ascii=False))
    return "\n".join(lines) + "\n"
