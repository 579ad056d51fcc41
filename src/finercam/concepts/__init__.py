r"""Zero-shot concepts with CLIP: where a text concept shows in an image, and what it adds to a reference concept.

With a vision-language model, text embeddings act as classifier rows: the logit of a prompt ``t`` is
``y_t = \tau \cos(f(x), g(t))``. Finer-CAM on the prompts ``[c, d_1, ..., d_T]`` explains
``y_c - \gamma\,\mathrm{mean}_t\, y_{d_t}``: ``"red beak"`` versus ``"bird"`` shows where the red beak is, rather than
the whole bird that both prompts match.

>>> from finercam.concepts import explain_concepts, ZeroShotClassifier, Siblings
>>> from finercam.embedded.clip_model import load_embedded_clip
>>> clip = load_embedded_clip()                                                      # doctest: +SKIP
>>> out = explain_concepts(clip, images, "white wingbar", versus="finch")             # doctest: +SKIP
>>> out.concept_maps, out.contrast_maps                                              # doctest: +SKIP
>>> classifier = ZeroShotClassifier.from_prompts(clip, ["finch", "warbler", "jay"])  # doctest: +SKIP
>>> FinerCAM(classifier)(images, references="weights", classifier_weights=classifier)  # doctest: +SKIP
"""

from finercam.concepts.api import ConceptExplanation, explain_concepts
from finercam.concepts.encoders import (
    CLIP_TEMPLATES,
    CLIPEncoders,
    HFCLIPImageEncoder,
    OpenCLIPImageEncoder,
    clip_encoders,
    from_embedded,
    from_hf,
    from_open_clip,
)
from finercam.concepts.references import Nearest, Parent, Siblings, nearest_rows, reference_prompts
from finercam.concepts.zero_shot import ZeroShotClassifier, encode_prompts

__all__ = [
    "CLIP_TEMPLATES",
    "CLIPEncoders",
    "ConceptExplanation",
    "HFCLIPImageEncoder",
    "Nearest",
    "OpenCLIPImageEncoder",
    "Parent",
    "Siblings",
    "ZeroShotClassifier",
    "clip_encoders",
    "encode_prompts",
    "explain_concepts",
    "from_embedded",
    "from_hf",
    "from_open_clip",
    "nearest_rows",
    "reference_prompts",
]
