"""Whether a deployed NAAF variant keeps NAAF's point: the negative branch's decisions on the mismatched word.

:mod:`itmrt.metrics.mismatched_words` judges score matrices. This module looks one step
further inside the deployed scorer graph (fp32, fp16 or int8, as the runtime
runs it): for every caption of image B (it names X) scored against image A
(which lacks X) and against B itself, did the negative branch fire on the word
X? It reads the graph's own boolean ``is_negative`` (``q_i < 0``), exposed as
an extra output, so what is counted is what the quantised graph decided - not
a float64 recomputation from its embeddings. Torch-free: numpy and ONNX
Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from itmrt.bundle.names import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS, LENGTHS
from itmrt.errors import ItmrtError
from itmrt.metrics.mismatched_words import Comparison
from itmrt.runtime.sessions import create_session

DECISION_TENSOR = "is_negative"
"""Name of the scorer graph's ``q < 0`` tensor, ``[images, captions, max_length]`` (``itmrt.families.naaf.graphs``)."""
MARGIN_TENSOR = "row_max"
"""Name of its ``r = max_j s_ij - t`` tensor: how far each word's best region is above the threshold."""


@dataclass
class WordDecisions:
    """Per comparison of ``own_image``: did the negative branch fire on the mismatched word X?"""

    x_on_lacking: np.ndarray  # bool [k]: X against image A, which lacks it (NAAF's point: should fire)
    x_on_holding: np.ndarray  # bool [k]: X against image B, which holds it (should not fire)
    x_margin_on_lacking: np.ndarray  # float [k]: r of X against A, its best similarity minus the threshold
    other_on_holding: np.ndarray  # int [k]: the caption's other words that fired against B

    def summary(self) -> dict[str, float]:
        return {
            "x_fired_on_lacking_image_%": float(100.0 * self.x_on_lacking.mean()),
            "x_fired_on_holding_image_%": float(100.0 * self.x_on_holding.mean()),
            "x_margin_on_lacking_image_median": float(np.median(self.x_margin_on_lacking)),
            "x_margin_on_lacking_image_min": float(self.x_margin_on_lacking.min()),
            "other_words_fired_on_holding_image": int(self.other_on_holding.sum()),
            "count": int(self.x_on_lacking.size),
        }

    def flips(self, reference: WordDecisions) -> dict[str, int]:
        """Decisions on X that differ from ``reference`` (another variant on the same comparisons)."""
        return {
            "x_on_lacking": int(np.count_nonzero(self.x_on_lacking != reference.x_on_lacking)),
            "x_on_holding": int(np.count_nonzero(self.x_on_holding != reference.x_on_holding)),
        }


def _decision_session(graph_file: Any) -> Any:
    """A session over the scorer graph with its ``is_negative`` and ``row_max`` tensors added as outputs."""
    import onnx

    model = onnx.load(str(graph_file))
    produced = {name for node in model.graph.node for name in node.output}
    for name in (DECISION_TENSOR, MARGIN_TENSOR):
        if name not in produced:
            raise ItmrtError(f"{graph_file} has no '{name}' tensor: not a NAAF scorer graph of this itmrt; "
                             "export the bundle again")
    inferred = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for name in (DECISION_TENSOR, MARGIN_TENSOR):  # typed as inferred: float16 in an FP16 graph's float16 parts
        elem_type = inferred.get(name, onnx.TensorProto.FLOAT)
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return create_session(model.SerializeToString(), optimization="basic")


def mismatched_word_decisions(
    runtime: Any, features: np.ndarray, meta: dict[str, Any], own_image: Comparison
) -> WordDecisions:
    """The deployed scorer's negative-branch decision on X for every ``own_image`` comparison.

    ``runtime``: an :class:`itmrt.runtime.api.Runtime` at the precision to examine (its encoders
    embed the two images and the caption; its scorer graph at that precision decides).
    """
    session = _decision_session(runtime.bundle.graph_file("scorer", runtime.precision))
    dtypes = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
    vocab = runtime.vocab
    lacking, holding, margins, others = [], [], [], []
    for (b, caption), (a, _) in zip(zip(*own_image.right), zip(*own_image.wrong)):
        text = meta["captions"][int(caption)]["text"]
        extra = vocab.word_id(str(meta["images"][int(a)]["extra"]))
        ids = vocab.encode(text)
        where = [k for k, token in enumerate(ids) if token == extra]
        if len(where) != 1:
            raise ItmrtError(f"caption {int(caption)} names its image's extra object {len(where)} times, not once")
        images = runtime.encode_images(np.asarray(features[[int(a), int(b)]]))
        encoded = runtime.encode_captions([text])
        tokens, lengths = encoded.padded([0])
        feeds = {IMAGE_EMBEDDINGS: images.astype(dtypes[IMAGE_EMBEDDINGS]),
                 CAPTION_EMBEDDINGS: tokens.astype(dtypes[CAPTION_EMBEDDINGS]), LENGTHS: lengths.astype(np.int32)}
        fired, margin = session.run([DECISION_TENSOR, MARGIN_TENSOR], feeds)
        fired = np.asarray(fired)[:, 0, : int(lengths[0])]  # [2 images, m]
        lacking.append(bool(fired[0, where[0]]))
        margins.append(float(np.asarray(margin)[0, 0, where[0]]))
        holding.append(bool(fired[1, where[0]]))
        others.append(int(np.delete(fired[1], where[0]).sum()))
    return WordDecisions(np.array(lacking, dtype=bool), np.array(holding, dtype=bool), np.array(margins),
                         np.array(others, dtype=np.int64))
