"""The heads a unit's loss reads its encoder piece through: the contrastive rules' decoder
([residual conv blocks] -> pooling -> projection MLP, MODEL.DECODER) and the linear classifier
of rules that train on labels."""
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")


def conv_block(block_type, channels):
    """One residual block of the encoder's own type (BasicBlock for ResNet-18/34, Bottleneck for
    ResNet-50/101) that halves the resolution, keeps the width and has a 1x1-conv shortcut: the
    paper's extra conv block of a local decoder. A BasicBlock at ResNet-50's widths would add
    ~80 M parameters to a unit on res5; the bottleneck adds ~9 M, like one more res5 block."""
    shortcut = nn.Sequential(nn.Conv2d(channels, channels, 1, stride=2, bias=False),
                             nn.BatchNorm2d(channels))
    if block_type is Bottleneck:
        return Bottleneck(channels, channels // Bottleneck.expansion, stride=2,
                          downsample=shortcut)
    return BasicBlock(channels, channels, stride=2, downsample=shortcut)


def projection_mlp(in_dim, hidden_dim, out_dim, layers):
    """`layers` Linear layers with BatchNorm + ReLU between them (SimCLR v2 style head)."""
    modules, dim = [], in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                    nn.ReLU(inplace=True)]
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*modules)


class Decoder(nn.Module):
    """Decoder of one unit: [conv blocks] -> global average pooling -> projection MLP."""

    def __init__(self, in_channels, conv_blocks=0, mlp_layers=2, proj_dim=128, hidden_dim=0,
                 block_type=BasicBlock):
        super().__init__()
        check_choice("conv_blocks", conv_blocks, (0, 1, 2))
        check_choice("mlp_layers", mlp_layers, (2, 4))
        self.blocks = nn.Sequential(*[conv_block(block_type, in_channels)
                                      for _ in range(conv_blocks)])
        self.mlp = projection_mlp(in_channels, hidden_dim or in_channels, proj_dim, mlp_layers)

    def forward(self, x):
        x = self.blocks(x)
        return self.mlp(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class LinearClassifier(nn.Module):
    """Decoder of the supervised rule: global average pooling -> one Linear layer to the class
    logits (torchvision ResNet's `avgpool` + `fc`)."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# Decoder options (MODEL.DECODER, lower-cased) of the rules whose units use `Decoder`.
DECODER_DEFAULTS = {"conv_blocks": 0, "mlp_layers": 2, "proj_dim": 128, "hidden_dim": 0}
