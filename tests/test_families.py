"""The family registry: a minimal family, registered here, goes through export, the runtime and parity on the
same code paths as NAAF, SCAN and CMPM - no other module of itmrt knows it.

The family ("tiny"): region features projected to unit token-sized embeddings, words embedded and normalised,
and a score that is each word's best region similarity averaged over the caption's words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from itmrt import families  # noqa: E402
from itmrt.bundle.check import check_bundle  # noqa: E402
from itmrt.bundle.names import (  # noqa: E402
    BATCH_CAPTIONS,
    BATCH_IMAGES,
    CAPTION_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    LENGTHS,
    MAX_LENGTH,
    NUM_REGIONS,
    REGION_FEATURES,
    SCORES,
    TOKEN_IDS,
    Component,
    Precision,
)
from itmrt.bundle.tolerances import DEFAULT_DEPLOYMENT_TOLERANCES, DeploymentTolerance  # noqa: E402
from itmrt.errors import ItmrtError  # noqa: E402
from itmrt.families import BuiltGraphs, GraphOptions, ScorerConstants  # noqa: E402
from itmrt.families.export_config import CORE_COMPONENTS, ExportConfig  # noqa: E402
from itmrt.families.precomputed_regions import RegionFeatureFamily  # noqa: E402
from itmrt.graphs.onnx_graph import FLOAT, INT32, GraphBuilder  # noqa: E402
from itmrt.text.vocab import Vocabulary  # noqa: E402

WORDS = [f"w{i}" for i in range(26)]
IMG_DIM, REGIONS, EMBED = 12, 5, 8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


class TinyModel(nn.Module):
    """The reference model: the interface every family's model has (encode_images, encode_captions, score)."""

    family = "tiny"

    def __init__(self, vocab_size: int, img_dim: int, embed_size: int) -> None:
        super().__init__()
        self.image_encoder = nn.Linear(img_dim, embed_size)
        self.image_encoder.img_dim, self.image_encoder.embed_size = img_dim, embed_size  # type: ignore[assignment]
        self.text_encoder = nn.Embedding(vocab_size, embed_size)
        self.text_encoder.vocab_size = vocab_size  # type: ignore[assignment]
        self.config = {"vocab_size": vocab_size, "img_dim": img_dim, "embed_size": embed_size}

    def encode_images(self, features: torch.Tensor) -> torch.Tensor:
        return _unit(self.image_encoder(features))

    def encode_captions(self, tokens: torch.Tensor, lengths: Any) -> torch.Tensor:
        lengths = torch.as_tensor(lengths)
        real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return _unit(self.text_encoder(tokens)) * real[..., None]

    def score(self, images: torch.Tensor, captions: torch.Tensor, lengths: Any) -> torch.Tensor:
        lengths = torch.as_tensor(lengths)
        sims = torch.einsum("cld,ind->icln", captions, images).amax(dim=-1)  # [Bi, Bc, L]
        real = torch.arange(captions.shape[1])[None, :] < lengths[:, None]
        return (sims * real[None]).sum(dim=-1) / lengths[None].to(sims.dtype)


def _image_graph(model: TinyModel, opset: int) -> onnx.ModelProto:
    g = GraphBuilder(Component.IMAGE_ENCODER.value, opset)
    features = g.input(REGION_FEATURES, FLOAT, [BATCH_IMAGES, NUM_REGIONS, IMG_DIM])
    weight = model.image_encoder.weight.detach().numpy().T
    projected = g.op("Add", [g.op("MatMul", [features, g.initializer(weight, "weight_t")]),
                             g.initializer(model.image_encoder.bias.detach().numpy(), "bias")])
    g.output(g.l2norm(projected), IMAGE_EMBEDDINGS, FLOAT, [BATCH_IMAGES, NUM_REGIONS, EMBED])
    return g.build({"component": Component.IMAGE_ENCODER.value})


def _text_graph(model: TinyModel, opset: int) -> onnx.ModelProto:
    g = GraphBuilder(Component.TEXT_ENCODER.value, opset)
    tokens = g.input(TOKEN_IDS, INT32, [BATCH_CAPTIONS, MAX_LENGTH])
    lengths = g.input(LENGTHS, INT32, [BATCH_CAPTIONS])
    embedded = g.op("Gather", [g.initializer(model.text_encoder.weight.detach().numpy(), "table"), tokens], axis=0)
    mask = g.unsqueeze(g.length_mask(lengths, tokens, 1), [2])
    g.output(
        g.where(mask, g.l2norm(embedded), g.const(0.0)), CAPTION_EMBEDDINGS, FLOAT, [BATCH_CAPTIONS, MAX_LENGTH, EMBED]
    )
    return g.build({"component": Component.TEXT_ENCODER.value})


def _scorer_graph(opset: int) -> onnx.ModelProto:
    g = GraphBuilder(Component.SCORER.value, opset)
    images = g.input(IMAGE_EMBEDDINGS, FLOAT, [BATCH_IMAGES, NUM_REGIONS, EMBED])
    captions = g.input(CAPTION_EMBEDDINGS, FLOAT, [BATCH_CAPTIONS, MAX_LENGTH, EMBED])
    lengths = g.input(LENGTHS, INT32, [BATCH_CAPTIONS])
    regions_t = g.transpose(g.unsqueeze(images, [1]), [0, 1, 3, 2])  # [Bi, 1, d, n]
    sims = g.op("MatMul", [g.unsqueeze(captions, [0]), regions_t])  # [Bi, Bc, L, n]
    best = g.reduce("ReduceMax", sims, [-1], False)  # [Bi, Bc, L]
    words = g.unsqueeze(g.length_mask(lengths, captions, 1), [0])
    total = g.reduce("ReduceSum", g.where(words, best, g.const(0.0)), [-1], False)
    scores = g.op("Div", [total, g.unsqueeze(g.op("Cast", [lengths], to=FLOAT), [0])])
    g.output(scores, SCORES, FLOAT, [BATCH_IMAGES, BATCH_CAPTIONS])
    return g.build({"component": Component.SCORER.value, "family": "tiny"})


class TinyExportConfig(ExportConfig):
    """What export checks the family's graphs against, and its parity tolerance."""

    family = "tiny"
    components = CORE_COMPONENTS
    parity_tolerance = 1e-5

    @property
    def deployment_tolerances(self) -> dict[str, DeploymentTolerance]:
        """The family's own fp32 limits for `itmrt parity`, tighter than the defaults."""
        own = DeploymentTolerance(score_max_abs=2e-5, rsum_abs_delta=0.25, top1_agreement_min=0.995,
                                  flip_rate_max=1e-3)
        return {**DEFAULT_DEPLOYMENT_TOLERANCES, Precision.FP32.value: own}


class TinyFamily(RegionFeatureFamily):
    """The whole of what itmrt needs to know about the family."""

    name: ClassVar[str] = "tiny"
    token_level: ClassVar[bool] = True

    def model_from_config(self, config: dict[str, Any]) -> TinyModel:
        return TinyModel(**config)

    def export_config(self) -> TinyExportConfig:
        return TinyExportConfig()

    def build_graphs(self, model: TinyModel, options: GraphOptions) -> BuiltGraphs:
        graphs = {Component.IMAGE_ENCODER.value: _image_graph(model, options.opset),
                  Component.TEXT_ENCODER.value: _text_graph(model, options.opset),
                  Component.SCORER.value: _scorer_graph(options.opset)}
        dims = {**model.config, "num_regions": options.num_regions}
        return BuiltGraphs(graphs, dims, ScorerConstants(options={"score": "mean of best region"}), None,
                           (options.num_regions, IMG_DIM))


@pytest.fixture()
def tiny_family():  # type: ignore[no-untyped-def]
    with families.registered(TinyFamily()) as spec:
        yield spec


def _data(folder: Path, images: int = 6) -> tuple[Path, np.ndarray, list[str]]:
    """A precomputed-feature test split (5 captions per image) and its vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    features = np.abs(rng.standard_normal((images, REGIONS, IMG_DIM))).astype(np.float32)
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 7)))) for _ in range(5 * images)]
    np.save(folder / "test_ims.npy", features)
    (folder / "test_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    Vocabulary.from_words(WORDS).to_json(folder / "vocab.json")
    return folder, features, captions


def _checkpoint(folder: Path) -> Path:
    from itmrt.models.native import save_native

    torch.manual_seed(0)
    return save_native(folder / "tiny.safetensors", TinyModel(len(WORDS) + 4, IMG_DIM, EMBED).eval())


def test_a_family_registered_in_a_test_goes_through_export_runtime_and_parity(tiny_family, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.families.checkpoints import load_checkpoint
    from itmrt.reports.parity_report import ParityOptions, run_parity
    from itmrt.reports.runtime_variants import parse_variants
    from itmrt.runtime import load

    data, features, captions = _data(tmp_path / "data")
    checkpoint = _checkpoint(tmp_path)
    # export: the checkpoint loads through the registry, the spec builds the graphs, parity against PyTorch passes
    manifest = export_bundle(checkpoint, data / "vocab.json", tmp_path / "bundle",
                             ExportOptions(num_regions=REGIONS, max_batch=16, max_length=10))
    assert manifest.family == "tiny" and max(manifest.parity.max_abs_error.values()) <= 1e-5  # type: ignore[union-attr]
    assert check_bundle(tmp_path / "bundle").ok  # every graph passes TensorRT's op table
    assert manifest.parity.tolerance == 1e-5  # type: ignore[union-attr]  # the family's exporter config's, not 1e-4

    # the runtime: the bundle's graphs score like the PyTorch model
    runtime = load(tmp_path / "bundle", threads=1)
    assert runtime.scorer_kind == "graph" and runtime.family is tiny_family
    scores = runtime.score(runtime.encode_images(features), runtime.encode_captions(captions))
    model = load_checkpoint(checkpoint)
    tokens, lengths = runtime.vocab.encode_batch(captions)
    with torch.no_grad():
        expected = model.score(model.encode_images(torch.from_numpy(features)),
                               model.encode_captions(torch.from_numpy(tokens), lengths), lengths).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)

    # parity report against the PyTorch reference, on the same code path as NAAF's
    run = run_parity(tmp_path / "bundle", data, ParityOptions(variants=parse_variants("ort:fp32"), threads=1))
    entry = run.report["variants"][0]
    assert run.report["bundle"]["family"] == "tiny" and entry["status"] == "ok" and entry["passed"]
    assert entry["decisions"] is None and entry["tensors"]["end_to_end"]["max_abs"] <= 1e-5
    # judged by the limits the family recorded in its bundle, not the defaults (the report runs without its code)
    recorded = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["deployment_tolerances"]
    assert recorded["fp32"]["score_max_abs"] == 2e-5 and recorded["int8"]["score_max_abs"] == 5e-2
    assert entry["tolerances"] == {"score_max_abs": 2e-5, "rsum_abs_delta": 0.25, "top1_agreement_min": 0.995,
                                   "flip_rate_max": 1e-3}
    assert {c["name"]: c["limit"] for c in entry["checks"]}["end-to-end score max abs error"] == 2e-5


def test_a_bundle_opens_without_its_familys_code_and_an_undescribed_one_is_refused(  # type: ignore[no-untyped-def]
        tiny_family, tmp_path: Path) -> None:
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.runtime import load

    data, features, captions = _data(tmp_path / "data")
    export_bundle(_checkpoint(tmp_path), data / "vocab.json", tmp_path / "bundle", ExportOptions(num_regions=REGIONS))
    with load(tmp_path / "bundle", threads=1) as runtime:
        expected = runtime.score(runtime.encode_images(features), runtime.encode_captions(captions))
    families.unregister("tiny")
    try:
        # the manifest's traits say how the bundle runs: its family's code is not needed to open and score it
        with load(tmp_path / "bundle", threads=1) as runtime:
            assert runtime.family is None and runtime.traits.scorer == "tiny"
            scores = runtime.score(runtime.encode_images(features), runtime.encode_captions(captions))
        np.testing.assert_array_equal(scores, expected)
        # a manifest without traits (written before export recorded them) names a family this itmrt must know
        path = tmp_path / "bundle" / "manifest.json"
        document = json.loads(path.read_text())
        del document["traits"]
        path.write_text(json.dumps(document))
        with pytest.raises(ItmrtError) as error:
            load(tmp_path / "bundle")
        assert str(error.value) == "unknown model family 'tiny'; this itmrt knows naaf, scan, cmpm"
    finally:
        families.register(tiny_family)  # the fixture unregisters it


def test_the_registry_holds_each_family_once() -> None:
    assert families.names()[:3] == ("naaf", "scan", "cmpm")
    assert families.get("naaf").fused_scorer and families.get("naaf").learns_threshold
    assert not families.get("cmpm").token_level and families.threshold_families() == ["naaf"]
    with pytest.raises(ValueError, match="already registered"):
        families.register(families.get("scan"))
    with pytest.raises(ItmrtError, match="unknown model family 'clip'"):
        families.get("clip")


def test_graphs_that_differ_from_the_export_config_are_refused(tmp_path: Path) -> None:
    from itmrt.export.bundle import ExportOptions, export_bundle

    class TwoGraphs(TinyExportConfig):
        components = (Component.IMAGE_ENCODER.value, Component.SCORER.value)

    class MisdeclaredFamily(TinyFamily):
        def export_config(self) -> TwoGraphs:
            return TwoGraphs()

    data, _, _ = _data(tmp_path / "data")
    with families.registered(MisdeclaredFamily()), pytest.raises(ItmrtError) as error:
        export_bundle(_checkpoint(tmp_path), data / "vocab.json", tmp_path / "bundle",
                      ExportOptions(num_regions=REGIONS))
    assert str(error.value) == "the tiny family's graphs do not match its export config: text_encoder is not declared"
    assert not (tmp_path / "bundle").exists()
