"""The cross-attention matcher: NAAF or SCAN encoders plus the family's scorer.

``CrossAttentionMatcher.from_opt`` reads the option names of the authors'
training scripts (``opt`` of a released checkpoint) and builds the same
architecture. Options a checkpoint lacks take the released scripts' defaults:

==========================  ===============  ===============
option                      NAAF default     SCAN default
==========================  ===============  ===============
img_dim                     2048             2048
embed_size                  1024             1024
word_dim                    300              300
num_layers                  1                1
precomp_enc_type            "basic"          "basic"
precomp_enc_text_type       "GloVe"          "basic"
no_imgnorm / no_txtnorm     False            False
bi_gru                      (always True)    False
lambda_softmax              20.0             9.0
thres_safe                  (required)       -
cross_attn                  -                "t2i"
raw_feature_norm            -                "clipped_l2norm"
agg_func                    -                "LogSumExp"
lambda_lse                  -                6.0
==========================  ===============  ===============

``vocab_size`` has no default (released NAAF evaluation recomputes it from the
vocabulary file; the checkpoint importer takes it from the embedding table).

Released-code facts this follows: NAAF's text GRU is always bidirectional (it
has no ``bi_gru`` option); NAAF picks the GloVe key layout (``embed.glove.weight``)
unless ``precomp_enc_text_type == "basic"``, and its GloVe encoder always
l2-normalises tokens, ignoring ``no_txtnorm``; the intra-caption factor 5 is
fixed; test-time scoring uses ``thres_safe`` with propagation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from itmrt.errors import CheckpointError, ItmrtError
from itmrt.families.naaf.model import NAAFScorer
from itmrt.families.scan.model import SCANScorer
from itmrt.models.torch_encoders import ImageEncoder, TextEncoder

FAMILIES = ("naaf", "scan")

_COMMON_DEFAULTS: dict[str, Any] = {
    "img_dim": 2048,
    "embed_size": 1024,
    "word_dim": 300,
    "num_layers": 1,
    "precomp_enc_type": "basic",
    "no_imgnorm": False,
    "no_txtnorm": False,
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "naaf": {**_COMMON_DEFAULTS, "precomp_enc_text_type": "GloVe", "lambda_softmax": 20.0},
    "scan": {
        **_COMMON_DEFAULTS,
        "precomp_enc_text_type": "basic",
        "bi_gru": False,
        "cross_attn": "t2i",
        "raw_feature_norm": "clipped_l2norm",
        "agg_func": "LogSumExp",
        "lambda_softmax": 9.0,
        "lambda_lse": 6.0,
    },
}
NAAF_INTRA_FACTOR = 5.0


def detect_family(opt: Mapping[str, Any]) -> str:
    """"naaf" when the options hold ``thres_safe``, "scan" when they hold ``cross_attn``."""
    if "thres_safe" in opt:
        return "naaf"
    if "cross_attn" in opt:
        return "scan"
    raise CheckpointError(
        "cannot tell the model family from its options (neither 'thres_safe' nor 'cross_attn' is set); "
        "pass family='naaf' or family='scan'"
    )


def embedding_layout_for(text_type: Any) -> str:
    """Key layout of the word embedding for a ``precomp_enc_text_type`` value."""
    name = str(text_type).lower()
    if name == "basic":
        return "plain"
    if name == "glove":
        return "glove"
    raise CheckpointError(f"unknown precomp_enc_text_type {text_type!r}: expected 'basic' or 'GloVe'")


def resolve_options(opt: Mapping[str, Any], family: str) -> tuple[dict[str, Any], list[str]]:
    """The options with the family's defaults filled in, and the names that were filled."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")
    if "vocab_size" not in opt or opt["vocab_size"] is None:
        raise CheckpointError("the model options lack 'vocab_size'; set it to the vocabulary's size")
    if family == "naaf" and "thres_safe" not in opt:
        raise CheckpointError("a NAAF model needs the option 'thres_safe' (the frozen test-time threshold)")
    resolved = dict(opt)
    filled = []
    for name, value in FAMILY_DEFAULTS[family].items():
        if name not in resolved or resolved[name] is None:
            resolved[name] = value
            filled.append(name)
    check_option_values(resolved)
    return resolved, filled


SIZE_OPTIONS = {"img_dim": 1 << 16, "embed_size": 1 << 16, "word_dim": 1 << 16, "num_layers": 16, "vocab_size": 1 << 24}
"""Integer options and their largest sane value (all at least 1)."""
REAL_OPTIONS = {"thres_safe": (-1.0, 1.0, False), "lambda_softmax": (0.0, 1e4, True), "lambda_lse": (0.0, 1e4, True)}
"""Float options: (low, high, low excluded)."""


def check_option_values(opt: Mapping[str, Any]) -> None:
    """Refuse sizes that are not positive integers within reason and constants that are NaN, infinite or out of
    range (a NAAF threshold compares cosine similarities: -1..1); one line naming the option."""
    for name, largest in SIZE_OPTIONS.items():
        value = opt.get(name)
        if value is None:
            continue
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral or not 1 <= value <= largest:
            raise CheckpointError(f"option {name!r} is {value!r}; it must be an integer from 1 to {largest}")
    for name, (low, high, low_open) in REAL_OPTIONS.items():
        value = opt.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high or (low_open and value == low):
            raise CheckpointError(f"option {name!r} is {value!r}; it must be a finite number in "
                                  f"{'(' if low_open else '['}{low:g}, {high:g}]")


class CrossAttentionMatcher(nn.Module):
    """Region encoder + token encoder + cross-attention scorer of one family ("naaf" or "scan")."""

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        scorer: NAAFScorer | SCANScorer,
        family: str,
        opt: Mapping[str, Any],
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise CheckpointError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.scorer = scorer
        self.family = family
        self.opt: dict[str, Any] = dict(opt)
        self.defaulted_options: list[str] = []
        # epoch / best_rsum / Eiters of the released checkpoint this came from, if any.
        self.checkpoint_info: dict[str, Any] = {}

    @classmethod
    def from_opt(cls, opt: Mapping[str, Any], family: str | None = None) -> CrossAttentionMatcher:
        """Build a fresh (randomly initialised) matcher from released option names.

        ``opt`` is a dict (``vars(checkpoint["opt"])``); ``family`` overrides the
        detection from the options. The returned matcher's ``opt`` holds every
        option with defaults filled in; ``defaulted_options`` lists the filled ones.
        """
        family = family if family is not None else detect_family(opt)
        resolved, filled = resolve_options(opt, family)
        try:
            matcher = cls._build(resolved, family)
        except ItmrtError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"invalid {family.upper()} model options: {exc}") from exc
        matcher.defaulted_options = filled
        return matcher

    @classmethod
    def _build(cls, opt: dict[str, Any], family: str) -> CrossAttentionMatcher:
        layout = embedding_layout_for(opt["precomp_enc_text_type"])
        image_encoder = ImageEncoder(
            img_dim=int(opt["img_dim"]),
            embed_size=int(opt["embed_size"]),
            precomp_enc_type=str(opt["precomp_enc_type"]),
            no_imgnorm=bool(opt["no_imgnorm"]),
        )
        scorer: NAAFScorer | SCANScorer
        if family == "naaf":
            bidirectional = True
            # The released GloVe text encoder is built with no_txtnorm=False whatever the option says.
            no_txtnorm = False if layout == "glove" else bool(opt["no_txtnorm"])
            scorer = NAAFScorer(
                threshold=float(opt["thres_safe"]),
                lambda_softmax=float(opt["lambda_softmax"]),
                intra_factor=NAAF_INTRA_FACTOR,
            )
        else:
            bidirectional = bool(opt["bi_gru"])
            no_txtnorm = bool(opt["no_txtnorm"])
            scorer = SCANScorer(
                cross_attn=str(opt["cross_attn"]),
                raw_feature_norm=str(opt["raw_feature_norm"]),
                agg_func=str(opt["agg_func"]),
                lambda_softmax=float(opt["lambda_softmax"]),
                lambda_lse=float(opt["lambda_lse"]),
            )
        text_encoder = TextEncoder(
            vocab_size=int(opt["vocab_size"]),
            word_dim=int(opt["word_dim"]),
            embed_size=int(opt["embed_size"]),
            num_layers=int(opt["num_layers"]),
            bidirectional=bidirectional,
            no_txtnorm=no_txtnorm,
            embedding_layout=layout,
        )
        return cls(image_encoder, text_encoder, scorer, family, opt)

    @property
    def embed_size(self) -> int:
        return self.image_encoder.embed_size

    @property
    def config(self) -> dict[str, Any]:
        """The released options (``opt``) that rebuild this architecture with :meth:`from_opt`."""
        return self.opt

    def encode_images(self, features: Tensor) -> Tensor:
        """Region features [B, n, img_dim] -> region embeddings [B, n, d]."""
        return self.image_encoder(features)

    def encode_captions(self, tokens: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        """Token ids [B, L] with real lengths -> token embeddings [B, L, d] (zeros at padding)."""
        return self.text_encoder(tokens, lengths)

    def score(self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        """Scores [Bi, Bc] of every image against every caption."""
        return self.scorer(image_emb, caption_emb, lengths)

    def use_negative_branch(self, enabled: bool) -> None:
        """Switch NAAF's negative branch on or off at test time (off: the paper's ablation; weights unchanged)."""
        if not isinstance(self.scorer, NAAFScorer):
            raise ItmrtError(f"only NAAF has a negative branch to switch off; this is a {self.family.upper()} model")
        self.scorer.negative_branch = bool(enabled)

    def forward(self, features: Tensor, tokens: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        return self.score(self.encode_images(features), self.encode_captions(tokens, lengths), lengths)
