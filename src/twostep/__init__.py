"""twostep: distil an 8-step flow-matching text-to-image model into a 2-step one (Z-Image Turbo++ recipe)."""

__version__ = "0.1.0"
