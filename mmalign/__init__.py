"""mmalign: CLIP-style multimodal alignment (per-modality adapters, one alignment core, Accelerate training)."""

__version__ = "0.1.0"
