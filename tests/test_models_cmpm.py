"""CMPM dual encoder: MobileNet v1 channel plan, shapes, cosine scores and the text max-pool semantics."""

from __future__ import annotations

import pytest
import torch

from itmrt.families.cmpm.model import CMPMModel, MobileNetV1, scaled_channels


def small_model(max_over_padding: bool = False, seed: int = 0) -> CMPMModel:
    torch.manual_seed(seed)
    model = CMPMModel(
        vocab_size=50, word_dim=16, lstm_hidden=32, embed_size=24, width_mult=0.25, image_size=64,
        max_over_padding=max_over_padding,
    )
    return model.eval()


def test_channel_rounding() -> None:
    assert scaled_channels(32, 1.0) == 32
    assert scaled_channels(32, 0.25) == 8
    assert scaled_channels(1024, 0.75) == 768
    assert scaled_channels(32, 0.1) == 8  # never below the divisor
    assert scaled_channels(1024, 0.5) == 512


def test_mobilenet_v1_matches_the_standard_network() -> None:
    net = MobileNetV1(1.0)
    # MobileNet v1 1.0-224 has 4,231,976 parameters with its 1024x1000 classifier;
    # without the classifier (1,025,000) the feature extractor has 3,206,976.
    assert sum(p.numel() for p in net.parameters()) == 3_206_976
    assert net.out_channels == 1024
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 13
    assert sum(1 for c in convs if c.stride == (2, 2)) == 5
    small = MobileNetV1(0.25)
    assert small.out_channels == 256
    assert small(torch.zeros(1, 3, 64, 64)).shape == (1, 256, 2, 2)  # overall stride 32


def test_shapes_and_cosine_range() -> None:
    model = small_model()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.randint(1, 50, (4, 7))
    lengths = torch.tensor([7, 3, 5, 2])
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens, lengths)
        scores = model.scores(img, txt)
        self_scores = model.scores(img, img)
    assert img.shape == (3, 24) and txt.shape == (4, 24)
    assert scores.shape == (3, 4)
    assert bool((scores.abs() <= 1 + 1e-6).all())
    torch.testing.assert_close(torch.diagonal(self_scores), torch.ones(3))
    # The score is the cosine: invariant to each embedding's scale.
    torch.testing.assert_close(model.scores(3.0 * img, 0.5 * txt), scores)
    torch.testing.assert_close(model(images, tokens, lengths), scores)


def test_text_embedding_is_batch_independent_by_default() -> None:
    model = small_model()
    torch.manual_seed(2)
    short = torch.randint(1, 50, (1, 3))
    batch = torch.randint(1, 50, (3, 9))
    batch[1, :3] = short[0]
    batch[1, 3:] = 0
    lengths = torch.tensor([9, 3, 6])
    with torch.no_grad():
        alone = model.encode_text(short, [3])
        together = model.encode_text(batch, lengths)
        # Extra padding columns change nothing either.
        wider = model.encode_text(torch.nn.functional.pad(batch, (0, 4)), lengths)
    torch.testing.assert_close(together[1], alone[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wider, together, atol=1e-6, rtol=1e-5)


def test_max_over_padding_reproduces_the_released_behaviour() -> None:
    model = small_model(max_over_padding=True)
    encoder = model.text_encoder
    torch.manual_seed(3)
    short = torch.randint(1, 50, (1, 3))
    padded = torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        real_max = encoder.token_features(short, [3]).max(dim=1).values
        expected = encoder.projection(real_max.clamp(min=0.0))  # zeros at padding join the max
        got = model.encode_text(padded, [3])
        alone = model.encode_text(short, [3])
    assert bool((real_max < 0).any()), "the test needs a negative coordinate to see the padding"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone, encoder.projection(real_max), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, alone, atol=1e-4)


def test_config_round_trip_and_bad_lengths() -> None:
    model = small_model(max_over_padding=True)
    clone = CMPMModel.from_config(model.config)
    assert clone.config == model.config
    assert clone.config["max_over_padding"] is True
    with pytest.raises(ValueError):
        CMPMModel.from_config({**model.config, "depth": 3})
    with pytest.raises(ValueError):
        model.encode_text(torch.ones(2, 4, dtype=torch.long), [4, 5])
