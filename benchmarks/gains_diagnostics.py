"""Where GAInS's two ingredients act, measured on a trained run: the GA weights in the mask loss and the ALRM
anomaly branch.

    python benchmarks/gains_diagnostics.py RUN/model_final.pth [--split val] [--out RUN/diagnostics_val.json]

On every image of the split (resized to data.min_size_test, no flips) with its ground-truth GA maps, each
GT box serves as a foreground RoI (the sampled RoIs of training overlap their GT with IoU >= 0.5, so these
are representative), and its 28 x 28 mask / GA crops are taken exactly as in training (gains.mask_head.TargetCrops).
Reported, over all RoI pixels of the GA-map category (model.num_classes' category `gamm.target_category_id`):
- anomalous pixels: the share of RoI pixels with GA > 1 (and > 1.1, "strong"), and the share of the total GA
  weight they carry;
- mean GA weight: the factor by which the weighted BCE scales the loss on average; together with the mode's
  mask loss weight (0.75 in branch_only / gains) the effective weight of an ordinary (GA = 1) pixel
  relative to Mask R-CNN's, and of an anomalous one;
- the share of the mask BCE (this model's own logits) that falls on anomalous pixels, unweighted and
  GA-weighted: how much of the mask loss the reweighting actually moves onto CTO pixels;
- ALRM (branch_only / gains): R² of the branch output against the GA crops (1 - MSE / MSE of the best
  constant, the crops' mean), its Pearson r, and its mean output on anomalous vs ordinary pixels: does
  the branch learn more than a constant?
Nothing is trained; the model is in eval mode (GroupNorm / frozen BN: the same function as in training).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gains.atomic import write_json_atomic  # noqa: E402
from gains.data import build_dataset  # noqa: E402
from gains.inference import load_for_inference  # noqa: E402
from gains.mask_head import MASK_TIE, TargetCrops  # noqa: E402
from gains.model import MODES  # noqa: E402

EPS = 1e-6  # GA > 1 + EPS counts as anomalous (maps are exactly 1 elsewhere)
STRONG = 1.1  # GA > STRONG: "strongly" anomalous (a fifth of the range of the paper's ga_factor 0.5)


def _split_as_training_data(cfg, split: str):
    """The split's images with GA maps attached, at the test scale and without random flips."""
    d = cfg.data
    d.train_json, d.train_images = getattr(d, f"{split}_json"), getattr(d, f"{split}_images")
    d.min_size_train, d.max_size_train = [int(d.min_size_test)], int(d.max_size_test)
    d.hflip_prob = d.vflip_prob = d.rot90_prob = 0.0
    d.intensity_scale, d.crop_size = None, None
    if cfg.model.mode == "mask_rcnn":
        cfg.model.mode = "gains"  # only so that the data set attaches GA maps; the model is already built
    return build_dataset(cfg, "train", is_train=True)


@torch.no_grad()
def diagnose(model, cfg, split: str) -> dict:
    mode = str(cfg.model.mode)
    weighted, branch = MODES[mode]
    dataset = _split_as_training_data(cfg, split)
    target_label = dataset.category_map.to_label(int(cfg.gamm.target_category_id))
    heads = model.roi_heads
    size = heads.mask_size
    max_ga = 1.0
    acc = {k: 0.0 for k in ("pixels", "anom", "strong", "w", "w_anom", "w_strong", "bce", "bce_anom", "wbce",
                            "wbce_anom")}
    ga_all, a_all, anom_all = [], [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        keep = target["labels"] == target_label
        if not keep.any():
            continue
        boxes = target["boxes"][keep].float()
        gt_index = torch.where(keep)[0]
        batch, _ = model.preprocess([image])
        features = model.backbone(batch)[:4]
        crops = TargetCrops([boxes], [gt_index], size)
        mask_t = crops([target["masks"]], lambda c: (c >= MASK_TIE).to(c.dtype))
        ga = crops([target["ga"]])
        x = heads.mask_pooler(features, [boxes])
        f_m, logits = heads.mask_head(x)
        labels = target["labels"][keep]
        picked = logits[torch.arange(len(labels)), labels - 1].float()
        bce = F.binary_cross_entropy_with_logits(picked, mask_t, reduction="none")
        anom = ga > 1 + EPS
        max_ga = max(max_ga, float(ga.max()))
        acc["pixels"] += ga.numel()
        acc["anom"] += float(anom.sum())
        acc["strong"] += float((ga > STRONG).sum())
        acc["w_strong"] += float(ga[ga > STRONG].sum())
        acc["w"] += float(ga.sum())
        acc["w_anom"] += float(ga[anom].sum())
        acc["bce"] += float(bce.sum())
        acc["bce_anom"] += float(bce[anom].sum())
        acc["wbce"] += float((ga * bce).sum())
        acc["wbce_anom"] += float((ga * bce)[anom].sum())
        if branch:
            a = heads.alrm(x, f_m)[torch.arange(len(labels)), labels - 1].float()
            ga_all.append(ga.flatten())
            a_all.append(a.flatten())
            anom_all.append(anom.flatten())
    if not acc["pixels"]:
        raise SystemExit(f"gains_diagnostics: no instance of category {cfg.gamm.target_category_id} in {split}")
    mask_weight = heads.mask_loss_weight
    mean_ga = acc["w"] / acc["pixels"]
    out = {"mode": mode, "split": split, "rois_pixels": int(acc["pixels"]),
           "anomalous_pixel_share": acc["anom"] / acc["pixels"],
           "anomalous_weight_share": acc["w_anom"] / acc["w"],
           "strong_pixel_share": acc["strong"] / acc["pixels"], "strong_weight_share": acc["w_strong"] / acc["w"],
           "mean_ga_weight": mean_ga, "max_ga_weight": max_ga,
           "mean_ga_on_anomalous": acc["w_anom"] / max(acc["anom"], 1),
           # a pixel's weight in loss_mask relative to Mask R-CNN's (weight 1, no GA)
           "mask_loss_weight": mask_weight,
           "effective_weight_ordinary_pixel": mask_weight,
           "effective_weight_anomalous_pixel_mean": mask_weight * (acc["w_anom"] / max(acc["anom"], 1) if weighted
                                                                   else 1.0),
           "bce_share_on_anomalous": acc["bce_anom"] / acc["bce"],
           "weighted_bce_share_on_anomalous": acc["wbce_anom"] / acc["wbce"]}
    if branch:
        ga, a, anom = torch.cat(ga_all), torch.cat(a_all), torch.cat(anom_all)
        mse = float(((a - ga) ** 2).mean())
        mse_const = float(((ga - ga.mean()) ** 2).mean())
        out.update({"alrm_mse": mse, "constant_mse": mse_const, "alrm_r2": 1.0 - mse / mse_const,
                    "alrm_pearson_r": float(torch.corrcoef(torch.stack([a, ga]))[0, 1]),
                    "alrm_mean_on_anomalous": float(a[anom].mean()) if anom.any() else None,
                    "alrm_mean_on_ordinary": float(a[~anom].mean())})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="model_final.pth of a training run")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--out", help="json to write (default: diagnostics_<split>.json beside the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.root=...)")
    args = p.parse_intermixed_args(argv)
    cfg, model, _ = load_for_inference(args.ckpt, overrides=args.overrides)
    model.cpu()
    out = diagnose(model, cfg, args.split)
    path = Path(args.out or Path(args.ckpt).parent / f"diagnostics_{args.split}.json")
    write_json_atomic(path, out)
    for k, v in out.items():
        print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
