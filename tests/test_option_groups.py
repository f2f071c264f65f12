"""Runtime, Ray and output options as one group each: declared once for the CLI, one object for the library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer

from itmrt.cli.app import app
from itmrt.cli.flags import OUTPUT_FLAGS, RUNTIME_FLAGS, runtime_group
from itmrt.cli.groups import OptionGroup
from itmrt.cli.ray_options import ray_group
from itmrt.errors import ItmrtError
from itmrt.runtime import RuntimeOptions, load
from itmrt.serve.client import ServiceClient
from itmrt.serve.server import ServeOptions, Service

from cli_helpers import run_cli
from runtime_helpers import IMG_DIM, VOCAB, make_bundle, random_captions, region_features
from serve_helpers import make_gallery, running

GROUP_COMMANDS = {"infer", "serve", "index", "explain", "bench", "parity"}
# flag -> the commands whose group gives it a help of their own (another default or wording); --overwrite: all
OWN_HELP = {"--on-long": {"serve"}, "--batch-size": {"index"}, "--precision": {"explain"},
            "--scorer": {"bench", "parity"}, "--overwrite": GROUP_COMMANDS}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("groups")
    naaf = make_bundle(root / "naaf")[0]
    scan = make_bundle(root / "scan", family="scan",
                       opt={"vocab_size": VOCAB, "img_dim": IMG_DIM, "embed_size": 32, "word_dim": 16})[0]
    np.save(root / "feats.npy", region_features(12, seed=3))
    (root / "caps.txt").write_text("\n".join(random_captions(9, seed=4, max_words=8)) + "\n")
    return {"root": root, "naaf": naaf, "scan": scan, "feats": root / "feats.npy", "caps": root / "caps.txt"}


def _options_by_command() -> dict[str, dict[str, Any]]:
    group: Any = typer.main.get_command(app)  # a click group (typer may carry its own click)
    return {name: {flag: param for param in command.params for flag in param.opts}
            for name, command in group.commands.items()}


def test_each_flag_is_explained_the_same_wherever_a_group_gives_it() -> None:
    commands = _options_by_command()
    group_flags = {"--" + name.replace("_", "-") for name in [*RUNTIME_FLAGS, *OUTPUT_FLAGS]}
    group_flags |= {"--ray", "--ray-workers", "--ray-cpus", "--ray-gpus", "--ray-retries", "--ray-timeout-s"}
    seen = 0
    for flag in sorted(group_flags):
        helps = {name: params[flag].help for name, params in commands.items()
                 if name in GROUP_COMMANDS and flag in params and name not in OWN_HELP.get(flag, set())}
        assert all(helps.values()), (flag, helps)  # --help explains every flag of every group
        assert len(set(helps.values())) <= 1, (flag, helps)
        seen += len(helps)
    assert seen >= 30
    for runtime_command in ("infer", "serve", "index"):  # the runtime group's shared core
        assert {"--backend", "--precision", "--providers", "--threads"} <= set(commands[runtime_command])
    assert {"--scorer", "--max-length", "--on-long", "--memory-mb", "--ray"} <= set(commands["infer"])


def test_a_group_refuses_a_flag_the_command_declares_itself() -> None:
    def command(threads: int = 0, runtime: Any = None) -> None:
        """Takes --threads twice."""

    with pytest.raises(TypeError, match="threads"):
        runtime_group("threads")(command)
    with pytest.raises(TypeError, match="no parameter 'ray'"):
        ray_group(command)
    with pytest.raises(TypeError, match="not flags of this group"):
        runtime_group("threads", "colour")
    built = OptionGroup("runtime", {name: RUNTIME_FLAGS[name] for name in ("threads", "scorer")},
                        lambda **flags: RuntimeOptions(**flags))
    calls: list[Any] = []
    wrapped = built(lambda source, runtime: calls.append((source, runtime)))
    wrapped(source="x", threads=2, scorer="graph")
    assert calls == [("x", RuntimeOptions(threads=2, scorer="graph"))]


def test_infer_takes_the_scorer_like_serve_and_bench(bundles: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    common = ["--captions", str(bundles["caps"]), "--images", str(bundles["feats"]), "--threads", "1"]
    scores = {}
    for scorer in ("graph", "fused", "auto"):
        result = run_cli(capsys, "infer", str(bundles["naaf"]), *common, "--scorer", scorer,
                         "--out", str(tmp_path / f"{scorer}.jsonl"), "--scores-out", str(tmp_path / f"{scorer}.npy"))
        assert result.code == 0, result.err
        scores[scorer] = np.load(tmp_path / f"{scorer}.npy")
    assert np.abs(scores["graph"] - scores["fused"]).max() <= 1e-4
    np.testing.assert_array_equal(scores["auto"], scores["fused"])  # auto takes the fused scorer here
    refused = run_cli(capsys, "infer", str(bundles["scan"]), *common, "--scorer", "fused",
                      "--out", str(tmp_path / "scan.jsonl"))
    assert refused.code == 2 and refused.err.startswith("error: ") and "fused scorer runs NAAF" in refused.err
    assert not (tmp_path / "scan.jsonl").exists()
    bad = run_cli(capsys, "infer", str(bundles["naaf"]), *common, "--scorer", "fastest", "--out", str(tmp_path / "x"))
    assert bad.code == 2 and "scorer" in bad.err and "fastest" in bad.err


def test_load_takes_the_group_and_keywords_replace_its_fields(bundles: dict[str, Path]) -> None:
    options = RuntimeOptions(threads=1, scorer="graph", batch_size=16)
    with load(bundles["naaf"], options, batch_size=7) as runtime:
        assert runtime.options == RuntimeOptions(threads=1, scorer="graph", batch_size=7)
        assert runtime.scorer_kind == "graph" and runtime.image_encoder.batch_size == 7
    assert options.batch_size == 16  # the group object itself is never changed
    with load(bundles["naaf"], threads=1, scorer="fused") as runtime:  # keywords alone, as before
        assert runtime.scorer_kind == "fused"
    with pytest.raises(TypeError, match="unknown runtime option.*colour"):
        load(bundles["naaf"], colour="red")
    with pytest.raises(ItmrtError, match="scorer"):
        load(bundles["naaf"], options, scorer="fastest")


def test_the_service_takes_the_same_group(bundles: dict[str, Path], tmp_path: Path) -> None:
    runtime = RuntimeOptions(threads=1, scorer="graph", on_long="refuse", budget_bytes=2 << 20)
    options = ServeOptions(port=0, configure_logging=False, runtime=runtime)
    assert (options.threads, options.scorer, options.memory_mb, options.on_long) == (1, "graph", 2, "refuse")
    assert options.runtime_options() is runtime
    flat = ServeOptions(threads=1, scorer="graph", memory_mb=2)
    assert flat.runtime_options() == runtime
    with pytest.raises(ItmrtError, match="not both.*threads"):
        ServeOptions(threads=2, runtime=runtime)
    gallery = make_gallery(bundles["naaf"], tmp_path / "gallery", region_features(12, seed=3))
    captions = random_captions(3, seed=5, max_words=6)
    with load(bundles["naaf"], runtime) as alone:
        expected = alone.search_text_to_image(captions, alone.open_gallery(gallery), k=4)
    with running(Service(gallery, options=options)) as live, ServiceClient(live.url) as client:
        answer = client.search(captions, 4)
    np.testing.assert_array_equal(np.asarray(answer.indices), np.asarray(expected.indices))
    np.testing.assert_allclose(np.asarray(answer.scores), np.asarray(expected.scores), rtol=0, atol=1e-6)


def test_the_runtime_flags_parse_into_one_runtime_options() -> None:
    from typer.testing import CliRunner

    seen: list[Any] = []
    tiny = typer.Typer()

    @tiny.command()
    @runtime_group(*RUNTIME_FLAGS)
    def command(name: str = typer.Argument(...), runtime: Any = None) -> None:
        seen.append((name, runtime))

    flags = ["--backend", "trt", "--precision", "fp16", "--providers", "cuda, cpu", "--threads", "1",
             "--scorer", "graph", "--max-length", "20", "--on-long", "refuse", "--batch-size", "8",
             "--memory-mb", "4", "--device", "2", "--gpu-mem-limit-mb", "512"]
    result = CliRunner().invoke(tiny, ["x", *flags])
    assert result.exit_code == 0, result.output
    assert seen == [("x", RuntimeOptions(backend="trt", precision="fp16", providers=["cuda", "cpu"], threads=1,
                                         scorer="graph", max_length=20, on_long="refuse", batch_size=8,
                                         budget_bytes=4 << 20, device=2, gpu_mem_limit_mb=512))]
    result = CliRunner().invoke(tiny, ["y"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == ("y", RuntimeOptions())  # no flag: the runtime's defaults, as load() has them
    assert CliRunner().invoke(tiny, ["z", "--device", "256"]).exit_code == 2
