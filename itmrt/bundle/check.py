"""``itmrt check BUNDLE``: verify a bundle without torch.

Checks, in order: the manifest reads (its schema, and the closed-world rules
of :mod:`itmrt.bundle.closed`: every file an entry names is listed with its
sha256 and stays inside the folder); every file it lists exists with the
recorded sha256, and a graph's external data is listed too; the vocabulary
holds what the manifest says; every graph passes ``onnx.checker`` and
TensorRT 10's op check, and its inputs/outputs are the ones the manifest
records; a NAAF scorer's frozen initializers hold the manifest's constants.
A graph whose file failed a check is not opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from itmrt.bundle.folder import read_bundle, verify_files
from itmrt.bundle.graph_entries import tensor_specs
from itmrt.bundle.manifest import FrozenConstant, Manifest
from itmrt.bundle.names import Component
from itmrt.bundle.trt_ops import check_trt_compat
from itmrt.errors import ItmrtError, first_line
from itmrt.text.vocab import Vocabulary


@dataclass
class BundleCheck:
    """Result of :func:`check_bundle`: ``problems`` (one line each) and a line per graph that passed."""

    bundle: Path
    family: str
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_constants(model: onnx.ModelProto, manifest: Manifest, graph_name: str) -> list[str]:
    initializers = {init.name: init for init in model.graph.initializer}
    input_names = {value.name for value in model.graph.input}
    problems = []
    constants: list[FrozenConstant | None] = [manifest.threshold, manifest.lambda_softmax, manifest.intra_factor]
    for constant in constants:
        if constant is None:
            continue
        name = constant.initializer
        if name in input_names:
            problems.append(f"graph '{graph_name}': '{name}' is a graph input; it must be a frozen initializer")
        elif name not in initializers:
            problems.append(f"graph '{graph_name}': initializer '{name}' is missing")
        else:
            value = numpy_helper.to_array(initializers[name])
            if value.shape != () or np.float32(value) != np.float32(constant.value):
                problems.append(
                    f"graph '{graph_name}': initializer '{name}' holds {value.tolist()}, "
                    f"the manifest says {constant.value}"
                )
    return problems


def _vocabulary_problems(bundle: Path, manifest: Manifest, problems: list[str]) -> list[str]:
    """The vocabulary file reads and holds the words, size and special ids the manifest records."""
    entry = manifest.vocab
    if any(problem.startswith(f"file '{entry.file}'") for problem in problems):
        return []
    try:
        vocabulary = Vocabulary.from_json(bundle / entry.file)
    except ItmrtError as exc:
        return [f"vocabulary '{entry.file}': {exc}"]
    recorded = (entry.size, entry.content_sha256, entry.pad_id, entry.start_id, entry.end_id, entry.unk_id)
    found = (len(vocabulary), vocabulary.sha256, vocabulary.pad_id, vocabulary.start_id, vocabulary.end_id,
             vocabulary.unk_id)
    if recorded != found:
        return [f"vocabulary '{entry.file}': {len(vocabulary)} words (special ids {found[2:]}), the manifest says "
                f"{entry.size} (special ids {recorded[2:]}) or another word list"]
    return []


def check_bundle(folder: str | Path) -> BundleCheck:
    """Verify the bundle at ``folder``; an unreadable manifest raises a one-line :class:`ItmrtError`."""
    bundle = Path(folder)
    manifest = read_bundle(bundle).manifest
    result = BundleCheck(bundle, manifest.family)
    result.problems.extend(verify_files(bundle, manifest))
    result.problems.extend(_vocabulary_problems(bundle, manifest, result.problems))
    for name, entry in manifest.graphs.items():
        path = bundle / entry.file
        if any(problem.startswith((f"file '{entry.file}'", f"graph '{name}'")) for problem in result.problems):
            continue  # already reported, and not to be opened: it may be anything
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:  # noqa: BLE001 - any parse/check failure is a problem line
            result.problems.append(f"graph '{name}': not a valid ONNX model: {first_line(exc)}")
            continue
        trt = check_trt_compat(model, entry.file)
        result.problems.extend(trt.problems)
        if tensor_specs(model.graph.input) != entry.inputs or tensor_specs(model.graph.output) != entry.outputs:
            result.problems.append(f"graph '{name}': inputs/outputs differ from the manifest")
        if name == Component.SCORER:
            result.problems.extend(_check_constants(model, manifest, name))
        if trt.ok:
            result.passed.append(f"{entry.file}: {sum(trt.ops.values())} nodes, TensorRT 10 op check passed")
    return result
