"""Text-encoder graphs: token ids + lengths -> token embeddings (NAAF/SCAN) or one embedding (CMPM).

Padding semantics: ONNX's GRU/LSTM with ``sequence_lens`` run each caption over
its own length only, and the reverse direction starts at the caption's last
real token - what PyTorch's packed sequences do. Outputs at padded positions
are then overwritten explicitly (zeros, or excluded from the max) so the result
does not depend on what a runtime leaves there.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from itmrt.bundle.names import BATCH_CAPTIONS, CAPTION_EMBEDDINGS, LENGTHS, MAX_LENGTH, TOKEN_IDS, Component
from itmrt.graphs.onnx_graph import FLOAT, INT32, GraphBuilder
from itmrt.models.torch_encoders import TextEncoder

# Row blocks of PyTorch's stacked gate weights, reordered to ONNX's gate order.
_GRU_TORCH_TO_ONNX = (1, 0, 2)  # torch (r, z, n) -> onnx (z, r, h)
_LSTM_TORCH_TO_ONNX = (0, 3, 1, 2)  # torch (i, f, g, o) -> onnx (i, o, f, c)


def _reorder_gates(weight: torch.Tensor, order: tuple[int, ...]) -> np.ndarray:
    blocks = weight.detach().to(torch.float32).cpu().chunk(len(order), dim=0)
    return torch.cat([blocks[k] for k in order], dim=0).numpy()


def _rnn_layer_weights(rnn: nn.RNNBase, layer: int, order: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """ONNX ``W [dirs, G*H, in]``, ``R [dirs, G*H, H]``, ``B [dirs, 2*G*H]`` of one PyTorch RNN layer."""
    suffixes = ["", "_reverse"] if rnn.bidirectional else [""]
    w, r, b = [], [], []
    for suffix in suffixes:
        w.append(_reorder_gates(getattr(rnn, f"weight_ih_l{layer}{suffix}"), order))
        r.append(_reorder_gates(getattr(rnn, f"weight_hh_l{layer}{suffix}"), order))
        if rnn.bias:
            b_ih = _reorder_gates(getattr(rnn, f"bias_ih_l{layer}{suffix}"), order)
            b_hh = _reorder_gates(getattr(rnn, f"bias_hh_l{layer}{suffix}"), order)
        else:
            b_ih = np.zeros(len(order) * rnn.hidden_size, np.float32)
            b_hh = np.zeros_like(b_ih)
        b.append(np.concatenate([b_ih, b_hh]))
    return np.stack(w), np.stack(r), np.stack(b)


def run_rnn(g: GraphBuilder, op_type: str, x_time_major: str, lengths: str, rnn: nn.RNNBase) -> str:
    """Stacked (bi)directional GRU/LSTM over ``[L, B, in]`` -> ``Y [L, dirs, B, H]`` of the last layer."""
    order = _GRU_TORCH_TO_ONNX if op_type == "GRU" else _LSTM_TORCH_TO_ONNX
    direction = "bidirectional" if rnn.bidirectional else "forward"
    layer_input = x_time_major
    y = x_time_major
    for layer in range(rnn.num_layers):
        w, r, b = _rnn_layer_weights(rnn, layer, order)
        inputs = [
            layer_input,
            g.initializer(w, f"{op_type.lower()}_l{layer}_W"),
            g.initializer(r, f"{op_type.lower()}_l{layer}_R"),
            g.initializer(b, f"{op_type.lower()}_l{layer}_B"),
            lengths,
        ]
        attrs: dict[str, object] = {"hidden_size": rnn.hidden_size, "direction": direction}
        if op_type == "GRU":
            attrs["linear_before_reset"] = 1  # PyTorch applies the reset gate after the hidden matmul
        y = g.op_multi(op_type, inputs, 1, f"{op_type.lower()}_l{layer}", **attrs)[0]
        if layer + 1 < rnn.num_layers:
            # [L, dirs, B, H] -> [L, B, dirs*H]: the next layer sees both directions concatenated.
            per_step = g.transpose(y, [0, 2, 1, 3], f"{op_type.lower()}_l{layer}_steps")
            layer_input = g.op(
                "Reshape", [per_step, g.const([0, 0, -1], np.int64)], f"{op_type.lower()}_l{layer}_concat"
            )
    return y


def embed_time_major(g: GraphBuilder, tokens: str, table: torch.Tensor) -> str:
    weight = table.detach().to(torch.float32).cpu().numpy()
    embedded = g.op("Gather", [g.initializer(weight, "embedding"), tokens], "embed", axis=0)  # [B, L, word_dim]
    return g.transpose(embedded, [1, 0, 2], "embed_time_major")  # [L, B, word_dim]


def text_encoder_graph(encoder: TextEncoder, opset: int) -> onnx.ModelProto:
    """``token_ids [Bc, L] int32``, ``lengths [Bc] int32`` -> ``caption_embeddings [Bc, L, d]``.

    Embedding (Gather) -> one ONNX GRU per layer with ``sequence_lens`` and
    ``linear_before_reset=1`` -> directions averaged -> per-token l2norm ->
    padded positions zeroed. Lengths must lie in [1, L].
    """
    g = GraphBuilder(Component.TEXT_ENCODER.value, opset)
    tokens = g.input(TOKEN_IDS, INT32, [BATCH_CAPTIONS, MAX_LENGTH])
    lengths = g.input(LENGTHS, INT32, [BATCH_CAPTIONS])
    x = embed_time_major(g, tokens, encoder.embedding_weight())
    y = run_rnn(g, "GRU", x, lengths, encoder.rnn)  # [L, dirs, B, H]
    if encoder.bidirectional:
        merged = g.reduce("ReduceMean", y, [1], False, "directions_mean")  # (fwd + bwd) / 2
    else:
        merged = g.squeeze(y, [1], "forward_only")
    batch_major = g.transpose(merged, [1, 0, 2], "gru_batch_major")  # [B, L, H]
    if not encoder.no_txtnorm:
        batch_major = g.l2norm(batch_major, -1, hint="token_l2norm")
    mask = g.unsqueeze(g.length_mask(lengths, tokens, 1), [2], "token_mask_3d")
    embeddings = g.where(mask, batch_major, g.const(0.0), "masked_tokens")
    g.output(embeddings, CAPTION_EMBEDDINGS, FLOAT, [BATCH_CAPTIONS, MAX_LENGTH, encoder.embed_size])
    return g.build({"component": Component.TEXT_ENCODER.value, "embedding_layout": encoder.embedding_layout})
