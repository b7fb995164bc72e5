"""cotrain: semi-supervised co-training (DCT-Seg, Duo-SegNet and baselines) for 3D segmentation.

The package does not import MONAI Label; ``apps/cotrain`` wires it to a MONAI Label server.
"""

__version__ = "0.1.0"
