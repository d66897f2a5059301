"""Adaptive Local Refinement Module: guidance fusion + anomaly branch + its loss (gains/METHOD.md §5-§6, §9).

With X the pooled RoI features (R x C x 14 x 14) and F_m the mask branch's conv features:
```
G   = ReLU(conv3x3 (C + D) -> D (concat[X, F_m]))      # guidance (the original's one effective conv, §7.4)
F_a = 4 x [conv3x3 D -> D + ReLU](G)                     # anomaly branch, same shape as the mask branch
L_a = conv1x1 D -> K(ReLU(deconv 2x2 s2 (F_a)))          # R x K x 28 x 28 GA regression
```
F_m is not detached: the anomaly loss trains the mask branch and the backbone through G. The branch only
runs in training; at test time the model is a plain Mask R-CNN.

The GA-weighted mask BCE itself (`loss_mask = w * mean(GA * BCE)`) is `mask_head.mask_loss` with the GA
crops as pixel weights; this file holds the anomaly-branch MSE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mask_head import ConvUpsampleHead


def anomaly_loss(ga_logits: Tensor, labels: Tensor, ga_targets: Tensor) -> Tensor:
    """loss_ga = mean over R x M x M of (a - GA)², a = the raw branch output at each RoI's GT class.

    ga_logits [R, K, M, M]; labels [R] int64 in 1..K; ga_targets [R, M, M] float (GA crops, >= 1).
    R == 0 gives `ga_logits.sum() * 0` so every parameter still receives a (zero) gradient.
    """
    if len(ga_logits) == 0:
        return ga_logits.sum() * 0
    picked = ga_logits[torch.arange(len(ga_logits), device=ga_logits.device), labels - 1]
    return F.mse_loss(picked, ga_targets, reduction="mean")


class ALRM(nn.Module):
    """Guidance conv + anomaly branch. `forward(x [R,C,S,S], f_m [R,D,S,S])` -> GA logits [R, K, 2S, 2S]."""

    def __init__(self, in_channels: int, conv_dim: int, num_classes: int, num_convs: int = 4,
                 guidance_init: str = "default"):
        super().__init__()
        self.guidance = nn.Conv2d(in_channels + conv_dim, conv_dim, 3, padding=1)
        # The authors never re-initialise their guidance conv: PyTorch's default Conv2d init ("default").
        # "kaiming" (normal, fan_out, bias 0, like the branch convs) was this project's earlier choice.
        if guidance_init == "kaiming":
            nn.init.kaiming_normal_(self.guidance.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(self.guidance.bias, 0.0)
        elif guidance_init != "default":
            raise ValueError(f"model.alrm.guidance_init must be default or kaiming, got {guidance_init!r}")
        self.branch = ConvUpsampleHead(conv_dim, conv_dim, num_classes, num_convs)

    def forward(self, x: Tensor, f_m: Tensor) -> Tensor:
        g = F.relu(self.guidance(torch.cat([x, f_m], dim=1)))
        return self.branch(g)[1]
