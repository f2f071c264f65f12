"""``itmrt eval``: Recall@K of a checkpoint on a precomputed-feature split, with the PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from itmrt.cli import flags
from itmrt.cli.app import app
from itmrt.cli.outputs import check_outputs, warn_on_stderr
from itmrt.errors import ItmrtError


@app.command("eval")
@flags.output_group("overwrite", "progress", overwrite=flags.overwrite("existing --json / --scores-out files"))
def eval_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint: released NAAF/SCAN *.pth.tar or an itmrt *.safetensors."),
    vocab: Path = typer.Option(..., "--vocab", help="Vocabulary JSON the model was trained with (released format)."),
    data: Path = typer.Option(..., "--data", help="Folder holding {split}_ims.npy and {split}_caps.txt."),
    split: str = typer.Option("test", "--split", help="Which split to evaluate (e.g. test, dev, testall)."),
    batch_size: int = flags.batch_size(128, "Images / captions encoded per batch."),
    fold5: bool = typer.Option(False, "--fold5", help="MSCOCO protocol: also report the mean over 5 folds of 1000 images."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the recall table to this JSON file."),
    scores_out: Path | None = typer.Option(None, "--scores-out", help="Write the score matrix (images x captions, float32 .npy)."),
    negative_branch: bool = typer.Option(True, "--negative-branch/--no-negative-branch", help="NAAF only: "
                                         "--no-negative-branch scores without the negative branch (the paper's "
                                         "ablation at test time: same weights and threshold)."),
    mismatched_words: bool = typer.Option(False, "--mismatched-words", help="Also print NAAF's point measured on "
                                          "the synthetic data's confusable pairs (needs {split}_meta.json): how often "
                                          "a caption naming an object the image lacks scores lower."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
) -> None:
    """Encode a split with the PyTorch reference model and print the standard recall table.

    i2t: image queries, best rank among its 5 captions; t2i: caption queries.
    R@K in percent, medr/meanr 1-based, rsum = sum of the six recalls.
    """
    from itmrt.bundle.names import REGION_FEATURES
    from itmrt.cli.progress import progress_bars
    from itmrt.data.precomp import PrecompSplit
    from itmrt.families import family_of
    from itmrt.families.checkpoints import load_checkpoint
    from itmrt.metrics.mismatched_words import accuracy, comparisons, format_accuracy, read_meta
    from itmrt.metrics.recall import coco_5fold_1k, format_recall_table
    from itmrt.models.evaluate import evaluate_split, load_vocabulary_for
    from itmrt.publish import atomic_write_files, float32_npy_bytes
    from itmrt.text.vocab import count_unknown_words

    check_outputs({"--json": json_path, "--scores-out": scores_out}, outputs.overwrite,
                  {"checkpoint": checkpoint, "vocabulary": vocab, "data folder": data})
    model = load_checkpoint(checkpoint)
    if family_of(model).image_input != REGION_FEATURES:
        raise ItmrtError(f"{checkpoint} holds a {model.family.upper()} model on images; `itmrt eval` evaluates precomputed "
                         "region features")
    model.eval()
    if not negative_branch:
        from itmrt.families.matcher import CrossAttentionMatcher

        assert isinstance(model, CrossAttentionMatcher)  # CMPM was refused above
        model.use_negative_branch(False)
    found = comparisons(read_meta(data, split)) if mismatched_words else None
    vocabulary = load_vocabulary_for(model, vocab)
    data_split = PrecompSplit.open(data, split)
    with progress_bars(outputs.progress) as bars:
        table, scores = evaluate_split(model, vocabulary, data_split, batch_size, bars)
    result: dict[str, object] = {"checkpoint": str(checkpoint), "data": str(data), "split": split,
                                 "negative_branch": negative_branch, "recall": table}
    typer.echo(f"{split}: {data_split.num_images} images, {len(data_split.captions)} captions")
    unknown = count_unknown_words(vocabulary, [vocabulary.encode(caption) for caption in data_split.captions])
    result["unknown_words"] = {"unknown": unknown.unknown, "words": unknown.words,
                               "captions_without_a_known_word": len(unknown.no_known_word)}
    if unknown.no_known_word:
        warn_on_stderr(unknown.summary())
    else:
        typer.echo(unknown.summary())
    typer.echo(format_recall_table(table))
    if fold5:
        folds = coco_5fold_1k(scores)
        result["fold5_1k"] = folds
        typer.echo("5-fold 1K:")
        typer.echo(format_recall_table(folds))
    if found is not None:
        mismatch = accuracy(scores, found)
        result["mismatched_words"] = mismatch
        typer.echo("mismatched words (confusable pairs):")
        typer.echo(format_accuracy(mismatch))
    files = [(json_path, (json.dumps(result, indent=2) + "\n").encode("utf-8"))] if json_path is not None else []
    if scores_out is not None:
        files.append((scores_out, float32_npy_bytes(scores)))
    if files:
        atomic_write_files(files, outputs.overwrite)
