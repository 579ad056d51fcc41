"""The web demo: its panels are the explanations' maps (checked against ``explain_image`` and ``explain_concepts``),
models are loaded once and lent one request at a time, the page serves both tabs over HTTP with finercam errors shown
as messages, and ``finercam web`` checks its options and loads every model before serving."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from finercam import synth
from finercam.cli import main
from finercam.concepts.api import explain_concepts
from finercam.concepts.loading import load_clip
from finercam.errors import FinerCAMError, InvalidArgumentError, MissingDependencyError
from finercam.explain_image import display_image, explain_image
from finercam.models import LoadedModel, load_model
from finercam.synth.spec import species_of
from finercam.web import GAMMA_STRIP, PREDICTED, ModelShelf, build_app, clip_shelf, model_shelf
from finercam.web import command as web_command
from finercam.web.views import concept_view, example_birds, explain_view, over, parse_prompts, to_uint8


@pytest.fixture(scope="module")
def cnn() -> LoadedModel:
    return load_model("embedded:cnn")


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return example_birds(tmp_path_factory.mktemp("birds"), 4)


def _state(model: torch.nn.Module) -> tuple[object, ...]:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return (model.training, hooks, tuple(p.requires_grad for p in model.parameters()),
            any(p.grad is not None for p in model.parameters()))


def test_explain_view_panels_are_the_explanations_maps(cnn: LoadedModel, examples: list[Any]) -> None:
    image = Image.open(examples[1].path)
    view = explain_view(cnn, image, gamma=0.6, num_references=2)
    expected = explain_image(cnn, cnn.preprocess(image.convert("RGB")), gamma=0.6, num_references=2)
    display = display_image(image.convert("RGB"), cnn.preprocess)
    assert view.explanation.target == expected.target and view.explanation.references == expected.references
    assert np.array_equal(view.panels[0].image, to_uint8(display))
    assert np.array_equal(view.panels[1].image, over(display, expected.result.baseline_maps[0]))
    assert np.array_equal(view.panels[2].image, over(display, expected.result.maps[0]))
    assert not np.array_equal(view.panels[1].image, view.panels[2].image)
    # The strip: gamma 0 is the base CAM and the chosen gamma the Finer-CAM panel, from the same forward pass.
    assert [panel.caption.split(" ")[0] for panel in view.strip] == [f"γ={g:g}" for g in GAMMA_STRIP]
    assert np.array_equal(view.strip[GAMMA_STRIP.index(0.0)].image, view.panels[1].image)
    assert np.array_equal(view.strip[GAMMA_STRIP.index(0.6)].image, view.panels[2].image)
    # Panels are enlarged for the screen by a whole factor: 64 px images become 256 px.
    assert view.panels[0].image.shape == (256, 256, 3) and view.panels[0].image.dtype == np.uint8
    probabilities = expected.result.probabilities[0]
    top = probabilities.topk(5)
    assert list(view.probabilities) == [cnn.class_names[int(i)] for i in top.indices]
    assert list(view.probabilities.values()) == pytest.approx(top.values.tolist())
    assert expected.prediction.name in view.summary
    assert all(reference.name in view.summary for reference in expected.references)



def test_explain_view_reads_images_as_the_command_line_does(cnn: LoadedModel, examples: list[Any],
                                                            tmp_path: Path) -> None:
    from finercam.images import load_image

    rgb = np.asarray(Image.open(examples[2].path).convert("RGB"))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    reference = explain_view(cnn, Image.fromarray(gray))
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16.png")  # a 16-bit scan of the same picture
    for same in (Image.open(tmp_path / "16.png"), tmp_path / "16.png", str(tmp_path / "16.png"), gray[:, :, None]):
        view = explain_view(cnn, same)
        assert view.summary == reference.summary
        assert all(np.array_equal(a.image, b.image) for a, b in zip(view.panels, reference.panels, strict=True))
    with_alpha = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 200, np.uint8)], axis=2)
    assert explain_view(cnn, with_alpha).summary == explain_view(cnn, rgb).summary
    for bad in (rgb[:, :, :2], np.zeros((8, 8, 5), np.uint8), rgb.astype(np.float32), np.zeros((0, 4), np.uint8)):
        with pytest.raises(InvalidArgumentError, match=r"expected an \(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\) "
                           r"uint8 image array|the image is empty"):
            explain_view(cnn, bad)
    # EXIF orientation is applied, as load_image does: a 40 x 20 photo taken sideways is shown 20 x 40
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb[:20, :40]).save(tmp_path / "side.jpg", exif=exif)
    upright = load_image(tmp_path / "side.jpg")
    assert upright.size == (20, 40)
    view = explain_view(cnn, Image.open(tmp_path / "side.jpg"))
    assert view.summary == explain_view(cnn, upright).summary


def test_page_errors_give_page_advice_and_names_show_as_written(cnn: LoadedModel, examples: list[Any]) -> None:
    import dataclasses

    from finercam.web.views import markdown_text

    image = Image.open(examples[0].path)
    with pytest.raises(FinerCAMError) as flat:
        explain_view(cnn, image, layer="fc")
    assert "finercam layers embedded:cnn" in str(flat.value) and "reshape=" not in str(flat.value)
    with pytest.raises(FinerCAMError) as unknown:
        explain_view(cnn, image, layer="stage9")
    assert "List the layers with: finercam layers embedded:cnn." in str(unknown.value)
    assert "named_modules" not in str(unknown.value)
    assert cnn.class_names is not None
    odd = dataclasses.replace(cnn, class_names=tuple(f"__{i:02d}_*class*__" for i in range(len(cnn.class_names))))
    view = explain_view(odd, image, target="3")
    assert "**Explained** \\_\\_03\\_\\*class\\*\\_\\_ (" in view.summary  # not bold "03_class" in italics
    assert markdown_text("white_wingbar <b>[x](y)</b> $$") == "white_wingbar \\<b\\>\\[x\\](y)\\</b\\> \\$\\$"

def test_explain_view_targets_by_name_or_index(cnn: LoadedModel, examples: list[Any]) -> None:
    image = Image.open(examples[0].path)
    names = cnn.class_names
    assert names is not None
    assert explain_view(cnn, image, target=names[7]).explanation.target.index == 7
    assert explain_view(cnn, image, target="7").explanation.target.index == 7
    predicted = explain_view(cnn, image).explanation.prediction
    assert explain_view(cnn, image, target=PREDICTED).explanation.target == predicted
    with pytest.raises(InvalidArgumentError, match=r"^the class 'osprey' is neither a class index nor a class name"):
        explain_view(cnn, image, target="osprey")
    others = [k for k in range(len(names)) if k != predicted.index][:2]
    given = explain_view(cnn, image, versus=f"{others[1]}, {names[others[0]]}")  # the versus box: names or indices
    assert [r.index for r in given.explanation.references] == [others[1], others[0]]
    assert "given reference(s)" in given.summary
    empty = explain_view(cnn, image, versus=" ").explanation  # an empty box: the references are chosen
    assert empty.references == explain_view(cnn, image).explanation.references
    with pytest.raises(InvalidArgumentError, match=r"^the versus box '.*' \(class \d+\) is the top prediction, "
                                                   r"explained by default.*to explain with the class box"):
        explain_view(cnn, image, versus=predicted.index)  # an int, as a client may send
    assert [r.index for r in explain_view(cnn, image, versus=[str(others[0])]).explanation.references] == others[:1]


def test_the_versus_box_keeps_class_names_with_commas(cnn: LoadedModel, examples: list[Any]) -> None:
    from finercam.web.views import _versus_classes

    names = ("tench, Tinca tinca", "goldfish", "great white shark")
    assert _versus_classes("tench, Tinca tinca", names) == [0]
    assert _versus_classes("goldfish, great white shark", names) == [1, 2]
    assert _versus_classes("tench, Tinca tinca; 2", names) == [0, 2]
    with pytest.raises(InvalidArgumentError, match=r"the versus class 'tench' is neither a class index nor"):
        _versus_classes("tench", names)


def test_explain_view_leaves_the_model_as_found(cnn: LoadedModel, examples: list[Any]) -> None:
    before = _state(cnn.model)
    explain_view(cnn, Image.open(examples[0].path), method="layercam")
    assert _state(cnn.model) == before
    with pytest.raises(InvalidArgumentError):
        explain_view(cnn, Image.open(examples[0].path), target="99")
    assert _state(cnn.model) == before


def test_bad_images_are_named(cnn: LoadedModel) -> None:
    with pytest.raises(InvalidArgumentError, match="no image: upload one, or pick an example"):
        explain_view(cnn, None)
    with pytest.raises(InvalidArgumentError, match=r"uint8 image array; got shape \(4, 4, 3\), dtype float32"):
        explain_view(cnn, np.zeros((4, 4, 3), dtype=np.float32))
    grey = explain_view(cnn, np.full((40, 30), 128, dtype=np.uint8))  # a grey array is taken as an RGB image
    assert grey.panels[0].image.shape[2] == 3


def test_concept_view_is_explain_concepts(examples: list[Any]) -> None:
    clip = load_clip("embedded:clip")
    example = examples[2]
    image = Image.open(example.path).convert("RGB")
    view = concept_view(clip, image, example.concept, f"{example.genus}, bird", gamma=1.0)
    expected = explain_concepts(clip.encoders, clip.preprocess(image), example.concept, [example.genus, "bird"],
                                gamma=1.0)
    display = clip.display(image)
    assert np.array_equal(view.panels[1].image, over(display, expected.concept_maps[0]))
    assert np.array_equal(view.panels[2].image, over(display, expected.contrast_maps[0]))
    cosines = expected.similarities[0].tolist()
    assert f"cosine {cosines[0]:.3f}" in view.summary and f"'bird': cosine {cosines[2]:.3f}" in view.summary
    with pytest.raises(InvalidArgumentError, match="the concept is empty"):
        concept_view(clip, image, "  ", "bird")
    with pytest.raises(InvalidArgumentError, match="the reference box is empty"):
        concept_view(clip, image, "red beak", " , ;")


def test_prompts_split_on_commas_semicolons_and_lines() -> None:
    assert parse_prompts("finch, bird;\n blue jay ,") == ["finch", "bird", "blue jay"]


def test_example_birds_take_the_genera_in_turn_and_name_a_coloured_part(tmp_path: Path) -> None:
    birds = example_birds(tmp_path, 6)
    config = synth.SynthConfig(image_size=64, species_per_genus=8)
    by_name = {species.name: species for species in species_of(config)}
    genera = [by_name[bird.species].genus_index for bird in birds]
    assert genera == [0, 1, 2, 0, 1, 2]
    for bird in birds:
        species = by_name[bird.species]
        value, part = bird.concept.split(" ")
        assert species.values[part] == value != "plain" and bird.genus == species.genus
        assert Image.open(bird.path).size == (64, 64)


def test_the_shelf_loads_each_model_once_and_lends_it_to_one_caller_at_a_time() -> None:
    loads: list[str] = []
    inside = []
    overlap = threading.Event()

    def loader() -> str:
        loads.append("m")
        return "model"

    shelf: ModelShelf[str] = ModelShelf({"m": loader})

    def borrow() -> None:
        with shelf.use("m"):
            inside.append(1)
            if len(inside) > 1:
                overlap.set()
            time.sleep(0.02)
            inside.pop()

    threads = [threading.Thread(target=borrow) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["m"] and shelf.get("m") == "model" and not overlap.is_set()
    with pytest.raises(InvalidArgumentError, match=r"unknown model 'x'; this demo offers \['m'\]"):
        shelf.get("x")
    with pytest.raises(InvalidArgumentError, match="at least one model"):
        ModelShelf({})


def test_without_gradio_the_page_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'finercam\[web\]'"):
        build_app(ModelShelf({"m": lambda: None}))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_page_serves_both_tabs_and_shows_errors_as_messages(examples: list[Any], cnn: LoadedModel,
                                                                 tmp_path: Path) -> None:
    import urllib.request

    from gradio_client import Client, handle_file

    app = build_app(model_shelf(["embedded:cnn"]), clip_shelf(), examples)
    port = _free_port()
    app.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port, quiet=True,
                                                  prevent_thread_lock=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and "finercam" in page.read().decode()
        client = Client(url, verbose=False)
        bird = examples[0]
        panels, label, summary, strip = client.predict(
            handle_file(str(bird.path)), "embedded:cnn", PREDICTED, "gradcam", 0.6, 3, "nearest", "mean",
            api_name="/explain",
        )
        expected = explain_view(cnn, Image.open(bird.path))
        assert label["label"] == expected.explanation.prediction.name
        assert summary == expected.summary
        assert len(panels) == 3 and len(strip) == len(GAMMA_STRIP)
        served = np.asarray(Image.open(panels[2]["image"]).convert("RGB"))
        assert np.array_equal(served, expected.panels[2].image)  # PNG: the very pixels computed
        concept_panels, concept_summary = client.predict(
            handle_file(str(bird.path)), "embedded:clip", bird.concept, bird.genus, 0.6, "gradcam",
            api_name="/concepts",
        )
        assert len(concept_panels) == 3 and repr(bird.concept) in concept_summary
        with pytest.raises(Exception, match="the class 'osprey' is neither a class index nor a class name"):
            client.predict(handle_file(str(bird.path)), "embedded:cnn", "osprey", "gradcam", 0.6, 3, "nearest",
                           "mean", api_name="/explain")
        _, _, at_stage2, _ = client.predict(handle_file(str(bird.path)), "embedded:cnn", PREDICTED, "gradcam", 0.6,
                                            3, "nearest", "mean", "stage2", api_name="/explain")
        assert at_stage2 == explain_view(cnn, Image.open(bird.path), layer="stage2").summary
        assert "Grad-CAM at `stage2`" in at_stage2
        _, _, versus, _ = client.predict(handle_file(str(bird.path)), "embedded:cnn", "3", "gradcam", 0.6, 3,
                                         "nearest", "mean", "", "5, 7", api_name="/explain")
        assert versus == explain_view(cnn, Image.open(bird.path), target="3", versus=["5", "7"]).summary
        with pytest.raises(Exception, match=r"target layer 'stage9' does not exist.*List the layers with: finercam "
                           r"layers embedded:cnn\."):
            client.predict(handle_file(str(bird.path)), "embedded:cnn", PREDICTED, "gradcam", 0.6, 3, "nearest",
                           "mean", "stage9", api_name="/explain")
        # a 16-bit upload reaches the model as finercam explain reads it (gradio would clip it to white)
        gray = np.asarray(Image.open(bird.path).convert("L"))
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "bird16.png")
        assert Image.open(tmp_path / "bird16.png").mode == "I;16"
        _, _, sixteen, _ = client.predict(handle_file(str(tmp_path / "bird16.png")), "embedded:cnn", PREDICTED,
                                          "gradcam", 0.6, 3, "nearest", "mean", api_name="/explain")
        assert sixteen == explain_view(cnn, Image.fromarray(gray)).summary
    finally:
        app.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["--weights", "w.safetensors"], "--weights needs --model"),
    (["--model", "nosuch:thing"], "unknown model kind 'nosuch'"),
    (["--model", "embedded:cnn", "--clip", "embedded:nosuch"], "nosuch"),
])
def test_the_command_refuses_bad_options_in_one_line(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_command, "serve", lambda *_: pytest.fail("served despite a bad option"))
    assert main(["web", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finercam web: ") and message in err and "\n" not in err


def test_the_command_rejects_a_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["web", "--port", "70000"])
    assert "must be a port number from 1 to 65535, got 70000" in capsys.readouterr().err


def test_the_command_loads_every_model_then_serves(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}

    def serve(app: Any, host: str, port: int) -> None:
        served.update(app=app, host=host, port=port, config=app.get_config_file())

    monkeypatch.setattr(web_command, "serve", serve)
    assert main(["web", "--no-concepts", "--port", "7999"]) == 0
    out = capsys.readouterr().out
    assert "loading embedded:cnn" in out and "loading embedded:vit" in out and "embedded:clip" not in out
    assert served["host"] == "127.0.0.1" and served["port"] == 7999
    labels = [c.get("props", {}).get("label") for c in served["config"]["components"]]
    assert "Concepts (CLIP)" not in labels and "model" in labels and "class to explain (a name or an index)" in labels


def test_a_class_name_not_found_is_shown_with_the_names_that_contain_it(cnn: LoadedModel) -> None:
    from finercam.explain_image import parse_target

    message = r"'finch' is neither .*; 8 class names contain it, e\.g\. \['00-finch"
    with pytest.raises(InvalidArgumentError, match=message):
        parse_target("finch", cnn.class_names)
    with pytest.raises(InvalidArgumentError, match=r"the closest class names: \['04-finch-yellow_beak"):
        parse_target("04-finch-yelow_beak-plain_wingbar-red_crown", cnn.class_names)


def test_a_port_in_use_or_a_bad_host_is_one_line_before_any_model_loads(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import finercam.web

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the address was checked")

    monkeypatch.setattr(finercam.web, "model_shelf", no_loading)
    accepted = ("give an address of this machine: 127.0.0.1 (this machine only), 0.0.0.0 (every interface), or an "
                "IPv6 address in brackets, e.g. [::1]")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        assert main(["web", "--model", "embedded:cnn", "--no-concepts", "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"finercam web: port {port} is in use on 127.0.0.1; give another --port, or stop what is " \
                           "using it\n"
    assert "serving on" not in captured.out
    for host, said in (("", "--host is empty"),
                       ("no.such.host.invalid", "--host 'no.such.host.invalid' is not an address or a known host name"),
                       ("192.0.2.1", "--host '192.0.2.1' is not an address of this machine")):  # a documentation net
        assert main(["web", "--host", host, "--port", str(port)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"finercam web: {said}") and error.endswith(f"; {accepted}\n"), error
        assert error.count("\n") == 1
    assert main(["web", "--host", "::1", "--port", str(port)]) == 2  # gradio serves IPv6 in brackets only
    assert capsys.readouterr().err == "finercam web: --host '::1' is an IPv6 address: write it in brackets, [::1]\n"


def test_concept_view_with_a_transformers_clip_on_a_wide_image(tmp_path: Path, hf_clip: Any) -> None:
    """Any CLIP finercam loads works in the concepts tab; a 50 x 30 image is shown at its own shape."""
    import warnings

    model, tokenizer = hf_clip
    model.save_pretrained(tmp_path / "hf-clip")
    tokenizer.save_pretrained(tmp_path / "hf-clip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(f"hf:{tmp_path / 'hf-clip'}", keep_aspect=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    prompts = ["bird", "fish"]
    view = concept_view(clip, image, "cat", ", ".join(prompts))
    expected = explain_concepts(clip.encoders, clip.preprocess(image), "cat", prompts)
    display = clip.display(image)
    assert np.array_equal(view.panels[2].image, over(display, expected.contrast_maps[0]))
    height, width = view.panels[0].image.shape[:2]
    assert width > height and np.array_equal(view.panels[0].image, to_uint8(display))


def test_ctrl_c_stops_the_server_with_one_line_and_status_130() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = subprocess.Popen(
        [sys.executable, "-m", "finercam", "web", "--model", "embedded:cnn", "--no-concepts", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        assert server.stdout is not None
        for line in server.stdout:
            if "serving on" in line or time.monotonic() > deadline:
                break
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 130, err[-1500:]
    assert err.strip() == "finercam web: interrupted (Ctrl-C)"
    assert "Keyboard interruption" not in out + err and "Closing server" not in out + err
