"""Where training memory goes: saved-activation measurement (and, later, per-category accounting)."""

from lightning_compact.memory.saved_activations import SavedActivations, SavedActivationTracker

__all__ = ["SavedActivations", "SavedActivationTracker"]
