"""The web demo's page (gradio): a classifier tab and a CLIP concepts tab over :mod:`finercam.web.views`.

>>> from finercam.web import build_app, clip_shelf, model_shelf         # doctest: +SKIP
>>> build_app(model_shelf(), clip_shelf()).launch()                   # doctest: +SKIP

Each handler turns a finercam error (a bad target name, an image the model cannot take, an empty prompt) into a
one-line message on the page, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from finercam.errors import FinerCAMError, MissingDependencyError
from finercam.explain_image import known_num_classes
from finercam.methods import METHODS
from finercam.objectives import AGGREGATIONS
from finercam.web.views import (
    GAMMA_STRIP,
    PREDICTED,
    ConceptView,
    ExampleBird,
    ExplainView,
    ModelShelf,
    Panel,
    concept_view,
    explain_view,
    target_choices,
)

TITLE = "finercam: Finer-CAM, what tells a class from its look-alikes"
INTRO = """\
**Finer-CAM** (CVPR 2025) explains `y_c − γ · y_refs`, the class's logit minus that of its most similar classes,
instead of `y_c` alone: the map shows what tells the class apart from its look-alikes, not everything that makes it
a bird. γ = 0 is the base CAM; the strip shows the map as γ grows."""
CONCEPTS_INTRO = """\
With a CLIP model, text prompts act as classifier rows: a concept ("white wingbar") against reference prompts
("finch") shows where the image shows what the concept adds to them. Separate several references with commas."""
REFERENCE_MODES = ("nearest", "top", "weights")
CACHE_LIFETIME = (3600, 3600)
"""gradio's ``delete_cache``: every hour, the uploads and pictures cached more than an hour ago are deleted (without
it the cache grows by about ten files a request for as long as the page is served)."""

T = TypeVar("T")


def _gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise MissingDependencyError(
            "the web demo needs gradio: pip install 'finercam[web]'"
        ) from None
    return gradio


def _shown_errors(gr: Any, call: Callable[[], T]) -> T:
    """Run ``call``; a finercam error becomes a message on the page."""
    try:
        return call()
    except FinerCAMError as error:
        raise gr.Error(str(error), print_exception=False) from None


def _gallery(panels: Sequence[Panel]) -> list[tuple[Any, str]]:
    """Panels as a gallery's (image, caption) items."""
    return [(panel.image, panel.caption) for panel in panels]


def build_app(models: ModelShelf[Any], clips: ModelShelf[Any] | None = None,
              examples: Sequence[ExampleBird] = ()) -> Any:
    """The demo page: ``models`` (a shelf of :class:`~finercam.models.LoadedModel`) in the classifier tab, ``clips``
    (of :class:`~finercam.concepts.loading.LoadedCLIP`) in the concepts tab (none: no such tab), ``examples`` as
    clickable inputs of both. Returns a ``gradio.Blocks``; call ``.launch()`` on it."""
    gr = _gradio()
    first = models.labels[0]

    def choices(label: str) -> Any:
        loaded = models.get(label)
        return gr.update(choices=target_choices(loaded.class_names, known_num_classes(loaded)), value=PREDICTED)

    def explain(image: Any, label: str, target: str, method: str, gamma: float, count: float, references: str,
                aggregation: str, layer: str = "", versus: str = "") -> tuple[Any, ...]:
        def run() -> ExplainView:
            with models.use(label) as loaded:
                return explain_view(loaded, image, method=method, gamma=float(gamma), num_references=int(count),
                                    references=references, aggregation=aggregation, target=target,
                                    layer=(layer or "").strip() or None, versus=versus)

        view = _shown_errors(gr, run)
        return _gallery(view.panels), view.probabilities, view.summary, _gallery(view.strip)

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=CACHE_LIFETIME) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Tab("Classifier"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="pil", image_mode=None, label="image", sources=["upload", "clipboard"])
                    model = gr.Dropdown(list(models.labels), value=first, label="model")
                    loaded_first = models.get(first)
                    target = gr.Dropdown(target_choices(loaded_first.class_names, known_num_classes(loaded_first)),
                                         value=PREDICTED, label="class to explain (a name or an index)",
                                         allow_custom_value=True)
                    method = gr.Dropdown(sorted(METHODS), value="gradcam", label="base CAM")
                    gamma = gr.Slider(0.0, 3.0, value=0.6, step=0.05, label="γ (comparison strength)")
                    count = gr.Slider(1, 10, value=3, step=1, label="reference classes T")
                    references = gr.Radio(list(REFERENCE_MODES), value="nearest", label="references")
                    aggregation = gr.Radio(list(AGGREGATIONS), value="mean",
                                           label="aggregation (mean: paper; softmax: official library)")
                    layer = gr.Textbox(value="", label="layer (empty: the model's own, else found automatically)",
                                       placeholder="e.g. layer4, blocks.-1.norm1")
                    versus = gr.Textbox(value="", label="versus: reference classes, names or indices separated by "
                                        "commas (empty: chosen by 'references' and T)", placeholder="e.g. 3, 5")
                    run = gr.Button("Explain", variant="primary")
                with gr.Column(scale=2):
                    panels = gr.Gallery(label="image, base CAM, Finer-CAM", columns=3, rows=1, height=340,
                                        object_fit="contain", format="png")
                    probabilities = gr.Label(num_top_classes=5, label="prediction")
                    summary = gr.Markdown()
                    strip = gr.Gallery(label="Finer-CAM as γ grows", columns=len(GAMMA_STRIP), rows=1, height=200,
                                       object_fit="contain", format="png")
            if examples:
                gr.Examples([[str(example.path)] for example in examples], inputs=[image], label="synthetic birds")
            inputs = [image, model, target, method, gamma, count, references, aggregation, layer, versus]
            run.click(explain, inputs, [panels, probabilities, summary, strip], api_name="explain")
            model.change(choices, [model], [target], api_name=False)
        if clips is not None:
            _concepts_tab(gr, clips, examples)
    return app


def _concepts_tab(gr: Any, clips: ModelShelf[Any], examples: Sequence[ExampleBird]) -> None:
    def localize(image: Any, label: str, concept: str, versus: str, gamma: float, method: str) -> tuple[Any, str]:
        def run() -> ConceptView:
            with clips.use(label) as loaded:
                return concept_view(loaded, image, concept, versus, gamma=float(gamma), method=method)

        view = _shown_errors(gr, run)
        return _gallery(view.panels), view.summary

    with gr.Tab("Concepts (CLIP)"):
        gr.Markdown(CONCEPTS_INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", image_mode=None, label="image", sources=["upload", "clipboard"])
                model = gr.Dropdown(list(clips.labels), value=clips.labels[0], label="CLIP model")
                embedded = clips.labels[0].startswith("embedded:")  # its vocabulary: the synthetic birds' words
                concept = gr.Textbox(value="white wingbar" if embedded else "red beak", label="concept")
                versus = gr.Textbox(value="finch" if embedded else "bird",
                                    label="versus (reference prompts, comma-separated)")
                gamma = gr.Slider(0.0, 3.0, value=0.6, step=0.05, label="γ")
                method = gr.Dropdown(sorted(METHODS), value="gradcam", label="base CAM")
                run = gr.Button("Localize", variant="primary")
            with gr.Column(scale=2):
                panels = gr.Gallery(label="image, plain concept map, contrast", columns=3, rows=1, height=340,
                                    object_fit="contain", format="png")
                summary = gr.Markdown()
        if examples:
            gr.Examples([[str(e.path), e.concept, e.genus] for e in examples], inputs=[image, concept, versus],
                        label="synthetic birds, a part each, versus their genus")
        run.click(localize, [image, model, concept, versus, gamma, method], [panels, summary], api_name="concepts")
