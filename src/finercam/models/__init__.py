"""Load any model a user has: torchvision, timm, transformers, open_clip, TorchScript or a Python factory.

Example:
    >>> from finercam.models import load_model  # doctest: +SKIP
    >>> loaded = load_model("timm:vit_base_patch14_dinov2", weights="dinov2_vitb14_pretrain.pth",
    ...                     head="classifier_birds_DINO.pth")  # doctest: +SKIP
    >>> logits = loaded.model(loaded.preprocess(image)[None])  # doctest: +SKIP

Nothing is downloaded: weights come from local files, local ``save_pretrained`` directories, or the local
Hugging Face / torch hub caches. The model libraries are optional extras, imported only when a spec needs them.
"""

from finercam.models.api import LoadedBackbone, LoadedModel, load_backbone, load_model
from finercam.models.heads import BackboneWithHead, load_head, save_head
from finercam.models.pooling import POOLING_MODES, PooledFeatures
from finercam.models.preprocess import PREPROCESS_PRESETS, Preprocess, get_preprocess
from finercam.models.spec import KINDS, parse_spec

__all__ = [
    "KINDS",
    "POOLING_MODES",
    "PREPROCESS_PRESETS",
    "BackboneWithHead",
    "LoadedBackbone",
    "LoadedModel",
    "PooledFeatures",
    "Preprocess",
    "get_preprocess",
    "load_backbone",
    "load_head",
    "load_model",
    "parse_spec",
    "save_head",
]
