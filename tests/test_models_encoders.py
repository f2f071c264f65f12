"""Image and text encoders: released key layouts, weight norm, packed GRU semantics."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from itmrt.errors import ItmrtError
from itmrt.models.ops import l2norm
from itmrt.models.torch_encoders import GloveEmbedding, ImageEncoder, TextEncoder, WeightNormLinear


def _features(seed: int = 0, batch: int = 3, regions: int = 4, dim: int = 12) -> torch.Tensor:
    return torch.randn(batch, regions, dim, generator=torch.Generator().manual_seed(seed))


def test_basic_image_encoder_keys_and_unit_norm() -> None:
    torch.manual_seed(0)
    encoder = ImageEncoder(img_dim=12, embed_size=6)
    assert set(encoder.state_dict()) == {"fc.weight", "fc.bias"}
    out = encoder(_features())
    assert out.shape == (3, 4, 6)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 4), atol=1e-6, rtol=0)
    # The released encoder initialises the bias to zero and the weight Xavier-uniform.
    assert isinstance(encoder.fc, nn.Linear)
    assert torch.count_nonzero(encoder.fc.bias) == 0
    assert encoder.fc.weight.abs().max() <= (6.0 / (12 + 6)) ** 0.5


def test_no_imgnorm_returns_the_linear_output() -> None:
    torch.manual_seed(0)
    encoder = ImageEncoder(img_dim=12, embed_size=6, no_imgnorm=True)
    x = _features()
    torch.testing.assert_close(encoder(x), encoder.fc(x))
    assert not torch.allclose(encoder(x).norm(dim=-1), torch.ones(3, 4))


def test_weight_norm_keys_shapes_and_folded_weight() -> None:
    torch.manual_seed(0)
    encoder = ImageEncoder(img_dim=12, embed_size=6, precomp_enc_type="weight_norm")
    state = encoder.state_dict()
    assert set(state) == {"fc.weight_g", "fc.weight_v", "fc.bias"}
    assert state["fc.weight_g"].shape == torch.Size([])
    assert isinstance(encoder.fc, WeightNormLinear)
    with torch.no_grad():
        encoder.fc.weight_g.fill_(2.5)
        encoder.fc.weight_v.mul_(3.0)
    folded = encoder.effective_weight()
    # W = g * V / ||V||_F: one scalar for the whole matrix, so ||W||_F = g.
    assert folded.norm().item() == pytest.approx(2.5, rel=1e-6)

    basic = ImageEncoder(img_dim=12, embed_size=6, precomp_enc_type="basic")
    assert isinstance(basic.fc, nn.Linear)
    with torch.no_grad():
        basic.fc.weight.copy_(folded)
        basic.fc.bias.copy_(encoder.fc.bias)
    x = _features(1)
    torch.testing.assert_close(encoder(x), basic(x), atol=1e-6, rtol=1e-5)


def test_weight_norm_loads_pytorch_weight_norm_state_dict_strictly() -> None:
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.nn.utils.weight_norm(nn.Linear(12, 6), dim=None)  # type: ignore[arg-type]
    weight_g = reference.weight_g
    assert isinstance(weight_g, torch.Tensor) and weight_g.shape == torch.Size([])
    with torch.no_grad():
        weight_g.fill_(0.7)
    encoder = ImageEncoder(img_dim=12, embed_size=6, precomp_enc_type="weight_norm", no_imgnorm=True)
    encoder.fc.load_state_dict(reference.state_dict(), strict=True)
    x = _features(2)
    torch.testing.assert_close(encoder(x), reference(x), atol=1e-6, rtol=1e-5)

    # Checkpoints from very old PyTorch stored g with shape [1].
    old_style = {k: (v.reshape(1) if k == "weight_g" else v) for k, v in reference.state_dict().items()}
    again = ImageEncoder(img_dim=12, embed_size=6, precomp_enc_type="weight_norm", no_imgnorm=True)
    again.fc.load_state_dict(old_style, strict=True)
    assert again.fc.weight_g.shape == torch.Size([])
    torch.testing.assert_close(again(x), reference(x), atol=1e-6, rtol=1e-5)


def test_unknown_options_raise_itmrt_errors() -> None:
    with pytest.raises(ItmrtError, match="precomp_enc_type"):
        ImageEncoder(12, 6, precomp_enc_type="resnet")
    with pytest.raises(ItmrtError, match="embedding_layout"):
        TextEncoder(10, 4, 6, embedding_layout="word2vec")


def _tokens(vocab: int, lengths: list[int], pad_to: int, seed: int = 0) -> torch.Tensor:
    """Random token ids; padded positions hold random ids too (they must not matter)."""
    return torch.randint(0, vocab, (len(lengths), pad_to), generator=torch.Generator().manual_seed(seed))


def _alone(encoder: TextEncoder, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """One caption run without packing or padding: GRU, average directions, l2norm."""
    out, _ = encoder.rnn(encoder.embed(tokens[:length].unsqueeze(0)))
    out = out[0]
    if encoder.bidirectional:
        out = (out[:, : encoder.embed_size] + out[:, encoder.embed_size :]) / 2
    return out if encoder.no_txtnorm else l2norm(out)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_gru_padded_batch_equals_each_caption_alone(bidirectional: bool, num_layers: int) -> None:
    torch.manual_seed(3)
    encoder = TextEncoder(30, word_dim=5, embed_size=7, num_layers=num_layers, bidirectional=bidirectional)
    encoder.eval()
    lengths = [2, 6, 4, 3]  # unsorted on purpose
    tokens = _tokens(30, lengths, pad_to=8)  # L = 8 > max length 6
    with torch.no_grad():
        out = encoder(tokens, torch.tensor(lengths))
        assert out.shape == (4, 8, 7)
        for b, length in enumerate(lengths):
            torch.testing.assert_close(out[b, :length], _alone(encoder, tokens[b], length), atol=1e-6, rtol=1e-5)
            assert torch.count_nonzero(out[b, length:]) == 0
        torch.testing.assert_close(out[:, :2].norm(dim=-1), torch.ones(4, 2), atol=1e-6, rtol=0)
        # A plain list of lengths works the same.
        torch.testing.assert_close(encoder(tokens, lengths), out)


def test_gru_no_txtnorm_skips_the_normalisation() -> None:
    torch.manual_seed(4)
    encoder = TextEncoder(20, word_dim=5, embed_size=7, no_txtnorm=True)
    tokens = _tokens(20, [5, 3], pad_to=5)
    with torch.no_grad():
        out = encoder(tokens, [5, 3])
        torch.testing.assert_close(out[1, :3], _alone(encoder, tokens[1], 3), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out[0].norm(dim=-1), torch.ones(5))


def test_bidirectional_gru_keys_follow_pytorch() -> None:
    encoder = TextEncoder(20, word_dim=5, embed_size=7, num_layers=2, bidirectional=True)
    keys = set(encoder.state_dict())
    assert {"embed.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0_reverse", "rnn.bias_ih_l1_reverse"} <= keys
    uni = TextEncoder(20, word_dim=5, embed_size=7, bidirectional=False)
    assert not any(key.endswith("_reverse") for key in uni.state_dict())


def test_glove_and_plain_layouts_compute_the_same() -> None:
    torch.manual_seed(5)
    plain = TextEncoder(25, word_dim=6, embed_size=8, embedding_layout="plain")
    glove = TextEncoder(25, word_dim=6, embed_size=8, embedding_layout="glove")
    plain_keys = set(plain.state_dict())
    glove_keys = set(glove.state_dict())
    assert "embed.weight" in plain_keys and "embed.glove.weight" not in plain_keys
    assert "embed.glove.weight" in glove_keys and "embed.weight" not in glove_keys
    assert plain_keys - {"embed.weight"} == glove_keys - {"embed.glove.weight"}
    assert isinstance(glove.embed, GloveEmbedding)
    assert not glove.embed.glove.weight.requires_grad

    renamed = {("embed.glove.weight" if k == "embed.weight" else k): v for k, v in plain.state_dict().items()}
    glove.load_state_dict(renamed, strict=True)
    tokens = _tokens(25, [4, 6, 2], pad_to=6)
    with torch.no_grad():
        torch.testing.assert_close(glove(tokens, [4, 6, 2]), plain(tokens, [4, 6, 2]), atol=0, rtol=0)
    torch.testing.assert_close(glove.embedding_weight(), plain.embedding_weight())
