"""Every example runs to completion with its fast settings, and what it reports holds."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

# examples and pages are what users copy: a heatmap there must take the fast path, without the hint
pytestmark = pytest.mark.filterwarnings("error::lrpfunc.ParamsRequireGradWarning")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = (
    "quickstart",
    "explanation_guided_training",
    "adversarial_explanation",
    "per_sample_and_all_classes",
    "custom_rule",
    "custom_canonizer",
    "distributed_attribution",
    "concepts",
    "faithfulness",
    "transformer_attribution",
    "generation",
    "speech",
    "export_explainer",
)


def _load(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:  # the examples import what they share from examples/common.py
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"lrpfunc_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    """The examples' models are tiny: one thread is faster, and immune to oversubscribed machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _valid_png(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        image.load()
        return image.size


@pytest.mark.parametrize("name", NAMES)
def test_example_has_a_story_and_main(name: str) -> None:
    module = _load(name)
    assert module.__doc__ and len(module.__doc__.strip().splitlines()) > 3
    signature = inspect.signature(module.main)
    assert list(signature.parameters) == ["argv", "fast"]
    assert signature.parameters["argv"].default is None
    assert signature.parameters["fast"].kind is inspect.Parameter.KEYWORD_ONLY
    assert signature.parameters["fast"].default is False


def test_quickstart(tmp_path: Path) -> None:
    result = _load("quickstart").main([str(tmp_path)], fast=True)
    rows, columns = result["rows"], len(result["columns"])
    assert rows == 6
    assert result["columns"] == ["input", "gradient", "integrated_gradients", "guided_backprop", "epsilon_plus_flat",
                                 "epsilon_gamma_box", "epsilon_alpha2_beta1"]
    cells = (columns * 128 + (columns - 1) * 2, rows * 128 + (rows - 1) * 2)  # 32x32 cells enlarged 4x
    width, height = result["grid_size"]  # the cells, their titles above, class labels left, a colour bar right
    assert cells[0] + 100 < width < cells[0] + 400 and cells[1] + 20 < height < cells[1] + 100
    assert _valid_png(tmp_path / "quickstart.png") == (width, height)
    assert len(result["row_labels"]) == rows and all("predicted" in label for label in result["row_labels"])
    assert result["test_accuracy"] >= 0.9
    area = result["object_area"]
    for name, share in result["positive_relevance_on_object"].items():
        assert share > 2 * area, name  # every method points at the object
    for name in ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"):
        assert result["positive_relevance_on_object"][name] > 5 * area, name


def test_explanation_guided_training(tmp_path: Path) -> None:
    result = _load("explanation_guided_training").main([str(tmp_path)], fast=True)
    plain, guided, lrp = result["plain"], result["gradient_penalty"], result["lrp_penalty"]
    # plain training takes the shortcut
    assert plain["accuracy_train"] > 0.95
    assert plain["accuracy_flipped"] < 0.2
    assert plain["gradient_share_on_decoy"] > 5 * result["decoy_area"]
    # the penalty removes the relevance on the decoy and the model learns the shape
    assert guided["gradient_share_on_decoy"] < 0.1 * plain["gradient_share_on_decoy"]
    assert guided["lrp_share_on_decoy"] < 0.1 * plain["lrp_share_on_decoy"]
    assert guided["accuracy_none"] > plain["accuracy_none"] + 0.3
    assert guided["accuracy_flipped"] > 0.9
    assert guided["accuracy_train"] > 0.9
    # penalising LRP relevance hides the decoy from LRP without removing the shortcut
    assert lrp["lrp_share_on_decoy"] < 0.2 * plain["lrp_share_on_decoy"]
    assert lrp["accuracy_flipped"] < 0.5
    for picture in result["pictures"]:
        _valid_png(picture)


def test_adversarial_explanation(tmp_path: Path) -> None:
    result = _load("adversarial_explanation").main([str(tmp_path)], fast=True)
    before, after = torch.tensor(result["distance_before"]), torch.tensor(result["distance_after"])
    assert len(before) == 3
    assert (after < before).all()  # every explanation moved toward its target
    assert after.sum() < 0.6 * before.sum()
    assert max(result["relative_output_change"]) < 0.08  # while the output barely moved
    assert all(result["same_prediction"])
    _valid_png(result["path"])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jacfwd set-up
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # the same warning on torch 2.14
def test_per_sample_and_all_classes_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _load("per_sample_and_all_classes").main([], fast=True)  # the default output folder
    path = tmp_path / "out" / "per_sample_and_all_classes" / "all_classes.png"
    assert Path(result["path"]).resolve() == path.resolve()
    assert _valid_png(path) == result["grid_size"] == (4 * 128 + 3 * 2, 5 * 128 + 4 * 2)
    assert result["shape_all_classes"] == (5, 3, 3, 32, 32)
    for key in ("per_sample_vmap_vs_loop", "per_sample_vmap_vs_batched", "all_classes_vmap_vs_loop",
                "all_classes_jacfwd_vs_loop"):
        assert result[key] < 1e-10, key


def test_custom_rule(tmp_path: Path) -> None:
    result = _load("custom_rule").main([str(tmp_path)], fast=True)
    assert result["closed_form_error"] < 1e-12
    assert result["builtin_zplus_error"] < 1e-12
    assert result["conservation_error"] < 1e-3  # measured 1.2e-4 (seed 0): relevance lost to dead units
    assert "zplus_relu" in result["rule_table"]
    _valid_png(result["path"])


def test_custom_canonizer(tmp_path: Path) -> None:
    result = _load("custom_canonizer").main([str(tmp_path)], fast=True)
    assert result["relu_direction_max"] == 0.0  # the ReLU network has no second-order signal
    assert result["softplus_direction_max"] > 1e-3
    assert result["custom_vs_builtin"] == 0.0
    assert result["finite_difference_relative_error"] < 1e-6
    _valid_png(result["path"])


_PORT_RACE = re.compile(r"address already in use|EADDRINUSE", re.IGNORECASE)


def test_distributed_attribution_equals_single_process(tmp_path: Path) -> None:
    module = _load("distributed_attribution")
    single = module.main([str(tmp_path / "single"), "--single"], fast=True)
    assert single["world_size"] == 1 and single["samples"] == 32
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / "distributed_attribution.py"), str(tmp_path / "distributed"), "--fast",
               "--backend", "gloo"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    if completed.returncode != 0 and _PORT_RACE.search(completed.stderr):
        # --standalone picks a free port and binds it later; another process may take it in between
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "by 2 process(es)" in completed.stdout
    reference = torch.load(tmp_path / "single" / "relevance.pt")
    distributed = torch.load(tmp_path / "distributed" / "relevance.pt")
    assert distributed["world_size"] == 2 and distributed["backend"] == "gloo"
    assert torch.equal(distributed["predictions"], reference["predictions"])
    scale = reference["relevance"].abs().max()
    assert scale > 0
    assert (distributed["relevance"] - reference["relevance"]).abs().max() <= 1e-5 * scale
    for folder in ("single", "distributed"):
        _valid_png(tmp_path / folder / "heatmaps.png")


def test_concepts(tmp_path: Path) -> None:
    result = _load("concepts").main([str(tmp_path)], fast=True)
    assert result["test_accuracy"] >= 0.9
    assert result["sum_of_concepts_vs_heatmap"] < 1e-5  # float32; every channel's map adds up to the heatmap
    assert result["vmap_vs_loop"] < 1e-5
    assert len(result["images"]) == 4
    for row in result["images"]:
        assert len(row["channels"]) == 5 and all(share > 0 for share in row["shares"])
        assert row["shares"] == sorted(row["shares"], reverse=True)
    assert _valid_png(result["path"]) == result["grid_size"] == (7 * 128 + 6 * 2, 4 * 142 + 3 * 2)


def test_faithfulness(tmp_path: Path) -> None:
    result = _load("faithfulness").main([str(tmp_path)], fast=True)
    abpc = result["abpc"]
    assert set(abpc) == {"epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "integrated_gradients",
                         "input_x_gradient", "guided_backprop", "gradient", "random"}
    assert abs(abpc["random"]) < 1.0  # a random order separates nothing
    for name, value in abpc.items():
        if name != "random":
            assert value > abpc["random"] + 3.0, name  # every method beats chance by far on this task
    assert result["ranking"][-1] == "random"
    table = Path(result["table"]).read_text().splitlines()
    assert table[0].startswith("| method | ABPC") and len(table) == 2 + len(abpc)
    _valid_png(result["path"])


def test_transformer_attribution(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    result = _load("transformer_attribution").main([str(tmp_path)], fast=True)
    # the model learned the task, and from the planted words (fast mode, seeds 0-11: drops 5.0-5.7 and 0.00-0.01)
    assert result["test_accuracy"] >= 0.95 and result["evaluated_accuracy"] >= 0.95
    assert result["logit_drop"]["evidence"] > 2.0
    assert abs(result["logit_drop"]["filler"]) < 0.5
    assert result["attribute_tokens_vs_attribute"] < 1e-4  # token ids in, or embeddings in: the same relevance
    # pictures: the PNG, and the pages with one span per token (4 reviews of 15 tokens; 5 methods on the second)
    assert _valid_png(result["png"])[0] >= 800
    pages = [Path(path).read_text(encoding="utf-8") for path in result["html"]]
    for page, spans in zip(pages, (4 * 15, 5 * 4 * 15), strict=True):
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        assert page.count("<span") == spans
    assert "&lt;sep&gt;" in pages[0]
    methods = ("attnlrp", "cp_lrp", "input_x_gradient", "gradient", "random")
    table = Path(result["table"]).read_text(encoding="utf-8").splitlines()
    assert table[0] == "| method | ABPC | AUC most | AUC least | top-1 on evidence |"
    assert [row.split(" | ")[0] for row in table[2:7]] == [f"| {name}" for name in methods]
    abpc, hits, chance = result["abpc"], result["top1_on_evidence"], result["chance_top1"]
    assert set(abpc) == set(hits) == set(methods)
    # measured in fast mode, seeds 0-11: random's ABPC -0.26..0.46, its hit rate within 0.06 of chance (~0.10);
    # AttnLRP and CP-LRP: ABPC 3.8-5.1, every top-1 token a planted word (1.00)
    assert abs(abpc["random"]) < 1.0
    assert abs(hits["random"] - chance) < 0.1
    for name in ("attnlrp", "cp_lrp"):
        assert abpc[name] > abpc["random"] + 2.0, name
        assert hits[name] > max(hits["random"], chance) + 0.5, name


def test_generation(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    result = _load("generation").main([str(tmp_path)], fast=True)
    assert result["copied"] >= 0.95  # the model learned the copy task
    # every generated token rests on its prompt token: the LRP methods find it, and removing what they rank first
    # hurts the generated token's logit far more than removing what they rank last
    for method in ("AttnLRP", "CP-LRP"):
        assert result["top1_on_evidence"][method] >= 0.9
        assert result["abpc"][method] > 3.0
    assert result["top1_on_evidence"]["random"] < 0.3
    assert _valid_png(result["png"])[0] > 100
    page = Path(result["html"]).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<table") == 3 and "&lt;sep&gt;" in page


def test_speech(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    result = _load("speech").main([str(tmp_path)], fast=True)
    assert result["transcribed"] >= 0.95  # the model learned to transcribe
    # each written note rests on its own frames: the LRP methods put nearly all relevance there, random a third
    for method in ("AttnLRP", "CP-LRP"):
        assert result["share_on_note"][method] > 0.85 and result["top1_on_note"][method] >= 0.9
    assert result["share_on_note"]["random"] < 0.45
    assert 0.7 < result["of_logit"] < 1.05 and result["conservation"] < 1e-3  # CP-LRP conserves but for the biases
    assert _valid_png(result["png"])[0] > 300


def test_export_explainer(tmp_path: Path) -> None:
    result = _load("export_explainer").main([str(tmp_path)], fast=True)
    # the reloaded program, without lrpfunc's tracing, on another batch size than the export's
    assert result["difference"] < 1e-5
    assert Path(result["path"]).stat().st_size > 0 and _valid_png(result["grid"])[0] > 0

