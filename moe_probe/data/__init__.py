"""Embedded data: sklearn digits + pydoc text as mixed LM / MMU / T2I sequences (no downloads)."""

from moe_probe.data.batch import KIND_LM, KIND_MMU, KIND_T2I, KINDS, Batch, Layout, images_to_patches, patches_to_images
from moe_probe.data.multimodal import DataConfig, MultimodalData
from moe_probe.data.tokenizer import DIGIT_WORDS, Tokenizer

__all__ = ["Batch", "DataConfig", "DIGIT_WORDS", "KINDS", "KIND_LM", "KIND_MMU", "KIND_T2I", "Layout",
           "MultimodalData", "Tokenizer", "images_to_patches", "patches_to_images"]
