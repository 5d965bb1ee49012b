"""DenseNet's features as its classifier reads them: rectified, at a layer hooks can reach.

torchvision's ``DenseNet.forward`` applies ``F.relu(features, inplace=True)`` after ``features``, a
function call no hook sees. Hooking ``features`` records the pre-ReLU map (about half its values
negative) and its gradient; a hook after it cannot give the gradient of the rectified map either,
because the model's own ReLU then masks it where the map is 0. :class:`RectifiedDenseNet` is the same
network with that ReLU as a module, ``rectified``: its output is what global pooling and the
classifier read, and its gradient is theirs (for a plain DenseNet, the classifier's weight over the
number of positions, everywhere), so Grad-CAM on it is Zhou et al.'s CAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

#: The layer the CAM methods explain in a :class:`RectifiedDenseNet`.
RECTIFIED_LAYER = "rectified"


class RectifiedDenseNet(DenseNet):
    """torchvision's DenseNet with the ReLU after ``features`` as a module; same parameters, same
    state_dict keys, same output."""

    rectified: nn.ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rectified(self.features(x))
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def with_rectified_features(model: nn.Module) -> nn.Module:
    """Turn a torchvision ``DenseNet`` (not a subclass of it with a forward of its own) into a
    :class:`RectifiedDenseNet`, in place; other models are returned as they are."""
    if type(model) is DenseNet:
        # The class changes, nothing else: every parameter, buffer and hook stays where it is.
        model.__class__ = RectifiedDenseNet
        model.rectified = nn.ReLU()
    return model
