"""masm: deepfake detection with Multi-Artifact Subspaces and selective layer Masks."""

__version__ = "0.1.0"
