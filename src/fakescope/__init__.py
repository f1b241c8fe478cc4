"""fakescope: train, evaluate, attack and serve detectors of AI-generated images."""

__version__ = "0.1.0"

LABELS: dict[str, int] = {"nature": 0, "ai": 1}
"""The one label map: real photographs are 0, AI-generated images are 1 (the positive class)."""

CLASS_NAMES: tuple[str, str] = ("nature", "ai")
