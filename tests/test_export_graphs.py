"""Component graphs built with onnx.helper: ONNX Runtime (CPU) against the PyTorch reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from itmrt.bundle.names import NAAF_INTRA_FACTOR, NAAF_LAMBDA, NAAF_THRESHOLD
from itmrt.families.cmpm.graphs import cmpm_image_encoder_graph, cmpm_text_encoder_graph, cosine_scorer_graph
from itmrt.families.cmpm.model import CMPMModel
from itmrt.families.naaf.graphs import naaf_scorer_graph
from itmrt.families.naaf.model import naaf_scores, naaf_scores_loop
from itmrt.families.scan.graphs import scan_scorer_graph
from itmrt.families.scan.model import scan_scores, scan_scores_loop
from itmrt.graphs.image_encoders import region_image_encoder_graph
from itmrt.graphs.text_encoders import text_encoder_graph
from itmrt.models.ops import l2norm
from itmrt.models.torch_encoders import ImageEncoder, TextEncoder

D = 32
VOCAB = 50
LENGTHS = torch.tensor([9, 2, 5, 3, 8, 9, 4, 6, 7, 2, 9, 5])  # every length 2..9, padded to 9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def embeddings(seed: int, num_images: int = 11, regions: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = l2norm(torch.randn(num_images, regions, D, generator=generator))
    captions = l2norm(torch.randn(len(LENGTHS), int(LENGTHS.max()), D, generator=generator))
    # Padding as an upstream encoder might leave it: garbage, which the scorer must ignore.
    return images, captions


def score_feeds(images: torch.Tensor, captions: torch.Tensor) -> dict[str, np.ndarray]:
    return {
        "image_embeddings": images.numpy(),
        "caption_embeddings": captions.numpy(),
        "lengths": LENGTHS.numpy().astype(np.int32),
    }


def assert_same_ranking(a: np.ndarray, b: np.ndarray, k: int = 10) -> None:
    for axis in (0, 1):
        top_a = np.argsort(-a, axis=axis, kind="stable").take(np.arange(k), axis=axis)
        top_b = np.argsort(-b, axis=axis, kind="stable").take(np.arange(k), axis=axis)
        np.testing.assert_array_equal(top_a, top_b)


@pytest.mark.parametrize("opset", [17, 18, 20])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2])
def test_naaf_scorer_matches_batched_and_literal_reference(opset: int, threshold: float) -> None:
    images, captions = embeddings(seed=1)
    graph = naaf_scorer_graph(D, threshold, 20.0, 5.0, opset)
    scores = run(graph, **score_feeds(images, captions))
    batched = naaf_scores(images, captions, LENGTHS, torch.tensor(threshold, dtype=torch.float32)).numpy()
    literal = naaf_scores_loop(images.double(), captions.double(), LENGTHS, float(np.float32(threshold))).numpy()
    assert scores.shape == (len(images), len(LENGTHS))
    assert np.abs(scores - batched).max() <= 1e-5
    assert np.abs(scores - literal).max() <= 1e-5
    assert_same_ranking(scores, batched)


def test_naaf_scorer_max_shifted_softmax_equals_raw_exp_in_float32() -> None:
    """Sims far above the threshold: exp(20 * a) is ~1e8; the stable graph still equals the literal raw-exp
    arithmetic in float32, and its own intermediate values stay finite where float16 would overflow."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1, D, generator=generator)
    images = l2norm(base + 0.05 * torch.randn(4, 6, D, generator=generator))
    captions = l2norm(base + 0.05 * torch.randn(len(LENGTHS), 9, D, generator=generator))
    sims = captions @ images[0].t()
    assert float(20 * (sims.max() - 0.0)) > 15  # exp(>15) > 65504 = float16 max: the raw form overflows there
    literal32 = naaf_scores_loop(images, captions, LENGTHS, 0.0).numpy()
    graph = naaf_scorer_graph(D, 0.0, 20.0, 5.0, 17)
    scores = run(graph, **score_feeds(images, captions))
    assert np.isfinite(scores).all()
    assert np.abs(scores - literal32).max() <= 1e-5


def test_naaf_scorer_constants_are_initializers_not_inputs() -> None:
    graph = naaf_scorer_graph(D, 0.1234567, 20.0, 5.0, 17)
    assert [value.name for value in graph.graph.input] == ["image_embeddings", "caption_embeddings", "lengths"]
    assert not any("thres" in value.name or "lambda" in value.name for value in graph.graph.input)
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}
    assert initializers[NAAF_THRESHOLD].shape == ()
    assert initializers[NAAF_THRESHOLD] == np.float32(0.1234567)
    assert initializers[NAAF_LAMBDA] == np.float32(20.0)
    assert initializers[NAAF_INTRA_FACTOR] == np.float32(5.0)
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    assert np.float32(float(metadata[NAAF_THRESHOLD])) == np.float32(0.1234567)
    symbolic = [[d.dim_param for d in v.type.tensor_type.shape.dim] for v in graph.graph.input]
    assert symbolic == [["batch_images", "num_regions", ""], ["batch_captions", "max_length", ""], ["batch_captions"]]


@pytest.mark.parametrize(
    "cross_attn, raw_feature_norm, agg_func",
    [
        ("t2i", "clipped_l2norm", "LogSumExp"),
        ("t2i", "softmax", "Mean"),
        ("t2i", "l1norm", "Max"),
        ("i2t", "clipped_l2norm", "Mean"),
        ("i2t", "no_norm", "Sum"),
        ("i2t", "clipped_l1norm", "LogSumExp"),
    ],
)
def test_scan_scorer_matches_reference(cross_attn: str, raw_feature_norm: str, agg_func: str) -> None:
    images, captions = embeddings(seed=2)
    lam = 9.0 if cross_attn == "t2i" else 4.0
    graph = scan_scorer_graph(D, cross_attn, raw_feature_norm, agg_func, lam, 6.0, 17)
    scores = run(graph, **score_feeds(images, captions))
    batched = scan_scores(images, captions, LENGTHS, cross_attn, raw_feature_norm, agg_func, lam, 6.0).numpy()
    literal = scan_scores_loop(  # the slow one-pair-at-a-time definition, on the first images only
        images[:3].double(), captions.double(), LENGTHS, cross_attn, raw_feature_norm, agg_func, lam, 6.0
    ).numpy()
    assert np.abs(scores - batched).max() <= 1e-5
    assert np.abs(scores[:3] - literal).max() <= 1e-5
    assert_same_ranking(scores, batched)


@pytest.mark.parametrize(
    "layout, num_layers, bidirectional, no_txtnorm",
    [("plain", 1, True, False), ("glove", 1, True, False), ("plain", 2, True, False), ("glove", 2, False, True)],
)
def test_text_encoder_gru_keeps_packed_semantics(
    layout: str, num_layers: int, bidirectional: bool, no_txtnorm: bool
) -> None:
    torch.manual_seed(4)
    encoder = TextEncoder(VOCAB, 16, D, num_layers, bidirectional, no_txtnorm, layout).eval()
    tokens = torch.randint(4, VOCAB, (len(LENGTHS), int(LENGTHS.max())))
    graph = text_encoder_graph(encoder, 17)
    lengths32 = LENGTHS.numpy().astype(np.int32)
    out = run(graph, token_ids=tokens.numpy().astype(np.int32), lengths=lengths32)
    with torch.no_grad():
        reference = encoder(tokens, LENGTHS).numpy()
    assert np.abs(out - reference).max() <= 1e-5
    for row, length in enumerate(LENGTHS.tolist()):
        assert not out[row, length:].any()  # padding comes out as zeros
        # The same caption alone, unpadded: the reverse direction must start at its own last token.
        alone = run(
            graph, token_ids=tokens[row : row + 1, :length].numpy().astype(np.int32), lengths=lengths32[row : row + 1]
        )
        assert np.abs(alone[0] - out[row, :length]).max() <= 1e-6


@pytest.mark.parametrize("precomp_enc_type", ["basic", "weight_norm"])
@pytest.mark.parametrize("no_imgnorm", [False, True])
def test_image_encoder_folds_weight_norm(precomp_enc_type: str, no_imgnorm: bool) -> None:
    torch.manual_seed(5)
    encoder = ImageEncoder(64, D, precomp_enc_type, no_imgnorm).eval()
    if precomp_enc_type == "weight_norm":
        with torch.no_grad():
            encoder.fc.weight_g.mul_(1.7)  # g differs from ||V||: the fold must use both
    features = torch.randn(3, 7, 64).abs()
    graph = region_image_encoder_graph(encoder, 17)
    assert [init.name for init in graph.graph.initializer if "weight" in init.name] == ["fc_weight_t"]
    with torch.no_grad():
        reference = encoder(features).numpy()
    assert np.abs(run(graph, region_features=features.numpy()) - reference).max() <= 1e-5


def calibrated_cmpm(max_over_padding: bool) -> CMPMModel:
    """A CMPM model whose BatchNorm statistics come from data, so activations do not vanish in eval mode."""
    torch.manual_seed(6)
    model = CMPMModel(VOCAB, 16, 12, D, width_mult=0.25, image_size=32, max_over_padding=max_over_padding)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.encode_image(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("max_over_padding", [False, True])
def test_cmpm_graphs_match_reference(max_over_padding: bool) -> None:
    model = calibrated_cmpm(max_over_padding)
    images = torch.randn(11, 3, 32, 32)
    tokens = torch.randint(4, VOCAB, (len(LENGTHS), int(LENGTHS.max())))
    with torch.no_grad():
        ref_images = model.encode_image(images)
        ref_text = model.encode_text(tokens, LENGTHS)
        ref_scores = model.scores(ref_images, ref_text)
    assert ref_images.std(dim=0).mean() > 1e-3  # images give different embeddings: the test can see errors
    onnx_images = run(cmpm_image_encoder_graph(model.image_encoder, 32, 17), images=images.numpy())
    onnx_text = run(
        cmpm_text_encoder_graph(model.text_encoder, 17),
        token_ids=tokens.numpy().astype(np.int32),
        lengths=LENGTHS.numpy().astype(np.int32),
    )
    onnx_scores = run(cosine_scorer_graph(D, 17), image_embeddings=onnx_images, caption_embeddings=onnx_text)
    # 27 conv layers (BatchNorm folded) round differently from PyTorch's conv-then-BN: the embeddings
    # (|x| ~ 1.5) agree to ~2e-5, about PyTorch float32's own distance from a float64 run.
    with torch.no_grad():
        truth = model.double().encode_image(images.double()).numpy()
    torch_error = np.abs(ref_images.numpy() - truth).max()
    assert np.abs(onnx_images - truth).max() <= 2 * torch_error + 1e-6
    assert np.abs(onnx_images - ref_images.numpy()).max() <= 5e-5
    assert np.abs(onnx_text - ref_text.numpy()).max() <= 1e-5
    # The scorer graph alone is exact to float32 rounding; end to end the CNN's rounding (above) shows.
    onnx_on_ref = run(
        cosine_scorer_graph(D, 17), image_embeddings=ref_images.numpy(), caption_embeddings=ref_text.numpy()
    )
    assert np.abs(onnx_on_ref - ref_scores.numpy()).max() <= 1e-6
    assert np.abs(onnx_scores - ref_scores.numpy()).max() <= 2e-5
    assert_same_ranking(onnx_scores, ref_scores.numpy())


def test_graphs_pass_checker_and_strict_inference() -> None:
    encoder = TextEncoder(VOCAB, 16, D)
    for graph in (text_encoder_graph(encoder, 17), naaf_scorer_graph(D, 0.1, 20.0, 5.0, 18)):
        onnx.checker.check_model(graph, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(graph, strict_mode=True)
        assert inferred.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inputs = text_encoder_graph(encoder, 17).graph.input
    assert {v.type.tensor_type.elem_type for v in inputs} == {onnx.TensorProto.INT32}
