"""Weights from anywhere to Detectron2: reading files from others safely (safe_load.py), finding
the ResNet encoder in other libraries' layouts (layouts.py), torchvision's ResNet as Detectron2
names it (resnet.py), conversion (convert.py) and its verification (verify.py, the only module
here that imports Detectron2). Command line: `loco-det convert` (loco_det/commands/convert.py).
"""
