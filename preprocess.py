#!/usr/bin/env python
"""Gradient Anomaly Mapping (GAMM): ground-truth masks -> one GA map per annotation.

    python preprocess.py --dataset isbi|ucoc|kaggle          # the paper's data sets, README layout + presets
    python preprocess.py --dataset synthetic [--out DIR]     # write the synthetic data set
    python preprocess.py --dataset dsb2018-sample [--out DIR] # real DSB2018 nuclei (needs the stardist wheel)
    python preprocess.py --from-labels IMAGES [--labels-dir DIR] --out DIR [--split-ratios 0.6 0.2 0.2]
    python preprocess.py --from-labelme JSON_DIR --out DIR [--split-ratios 0.6 0.2 0.2]
    python preprocess.py --from-imagej-rois IMAGES [--annotations-dir DIR] --out DIR [--category-from name|group]
    python preprocess.py --from-geojson IMAGES [--annotations-dir DIR] --out DIR [--category-from class|name|none]
    python preprocess.py --from-instance-stacks IMAGES [--annotations-dir DIR] --out DIR
    python preprocess.py --from-dsb2018 DSB_DIR --out DIR
    python preprocess.py --from-detectron2 model_final.pth --config configs/isbi_r50.yaml --out OUT.pth \
        [key=value ...] [--allow-partial] [--allow-config-mismatch]  # the authors' released models
    python preprocess.py --inspect-weights model_final.pth   # format and the config values it implies
    python preprocess.py --json A.json --images DIR --variant isbi --window-size 5 --ga-factor 0.5 \
        --overlap-hl 0.1 --target-category 0 [--out DIR] [--workers N] [--dtype float32|float16]
        [--layout compact|authors]

--from-detectron2 writes a gains checkpoint for `evaluate.py --ckpt OUT.pth` (gains/convert_checkpoint.py).
--from-labels, --from-labelme, the other --from-* converters of annotations (Fiji ROI sets, QuPath GeoJSON,
instance stacks, the DSB2018 layout; these keep overlapping instances) and --dataset dsb2018-sample write a COCO
data set folder (train.json + train/, val.json + val/, test.json + test/).
Maps go to `<out or images>/anomap_ws{N}_f{F}_ol{O}/`: by default one compact lossless `image_{image_id}.npz`
per image (each map as a crop on its support, gains/ga_store.py); `--layout authors` writes the authors'
`{annotation_id}.npy`, one dense H x W array per annotation. Training reads both.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# name -> (json, images, variant, window_size, ga_factor, overlap_hl, target_category); the authors' values
PRESETS = {
    "isbi": ("data/isbi2014/train.json", "data/isbi2014/train", "isbi", 5, 0.5, 0.1, 0),
    "ucoc": ("data/ucoc/train.json", "data/ucoc/train", "chrom", 5, 0.5, 0.3, 1),
    "kaggle": ("data/kaggle2018/train.json", "data/kaggle2018/train", "nuclei", 8, 0.8, 0.1, 1),
}
DATASETS = (*PRESETS, "synthetic", "dsb2018-sample")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, help="preset: paths of the README layout + authors' values")
    p.add_argument("--json", type=Path, help="COCO instances json of the training split")
    p.add_argument("--images", type=Path, help="image folder of that json")
    p.add_argument("--variant", choices=("isbi", "chrom", "nuclei"))
    p.add_argument("--window-size", type=int)
    p.add_argument("--ga-factor", type=float)
    p.add_argument("--overlap-hl", type=float)
    p.add_argument("--target-category", type=int, help="json category id that gets maps")
    p.add_argument("--out", type=Path, help="parent folder of the map folder (default: the image folder); "
                   "for --dataset synthetic: where the data set is written")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--layout", choices=("compact", "authors"), default="compact",
                   help="compact: one image_{id}.npz of crops per image (default, lossless); "
                        "authors: one dense {annotation_id}.npy per annotation")
    p.add_argument("--overwrite", action="store_true", help="recompute maps that already exist; converters: "
                   "replace an existing --out folder")
    p.add_argument("--visualize", type=int, default=0, metavar="K", help="write PNG overlays for K images")
    convert = p.add_argument_group("converters (write a COCO data set folder to --out)")
    convert.add_argument("--from-labels", type=Path, metavar="IMAGES_DIR",
                         help="images + instance label images (X.tif + X_masks.tif, or --labels-dir)")
    convert.add_argument("--labels-dir", type=Path, help="label images named like the images")
    convert.add_argument("--from-labelme", type=Path, metavar="JSON_DIR", help="folder of labelme *.json")
    convert.add_argument("--from-imagej-rois", type=Path, metavar="IMAGES_DIR",
                         help="images + Fiji / ImageJ ROI sets (X.zip, X_rois.zip, X.roi or a folder X/ of .roi "
                              "files): one area ROI = one instance, overlaps kept")
    convert.add_argument("--from-geojson", type=Path, metavar="IMAGES_DIR",
                         help="images + QuPath GeoJSON (X.geojson or X.<ext>.geojson, from File > Export objects "
                              "as GeoJSON): one Polygon / MultiPolygon = one instance, holes and overlaps kept")
    convert.add_argument("--from-instance-stacks", type=Path, metavar="IMAGES_DIR",
                         help="images + multi-page TIFFs X_masks.tif with one binary page per instance")
    convert.add_argument("--from-dsb2018", type=Path, metavar="DIR",
                         help="the DSB2018 layout: DIR/ID/images/ID.png + DIR/ID/masks/*.png (one PNG per instance)")
    convert.add_argument("--annotations-dir", type=Path,
                         help="folder of the ROI sets / GeoJSON files / instance stacks (default: the image folder)")
    convert.add_argument("--category-from", choices=("none", "name", "group", "class"),
                         help="category of an instance: ROI name (without the ROI Manager's -N suffix) or ROI group "
                              "(--from-imagej-rois; default none: one class, --category-name); QuPath "
                              "classification or object name (--from-geojson; default class, unclassified objects "
                              "get --category-name)")
    convert.add_argument("--split-ratios", type=float, nargs=3, default=(0.6, 0.2, 0.2),
                         metavar=("TRAIN", "VAL", "TEST"), help="image split (default 0.6 0.2 0.2; seed 0)")
    convert.add_argument("--category-name", default="cell",
                         help="category of label-image, stack and DSB2018 instances, and of instances without one")
    weights = p.add_argument_group("the authors' detectron2 checkpoints (write a gains checkpoint to --out)")
    weights.add_argument("--from-detectron2", type=Path, metavar="CKPT",
                         help="detectron2 GAInS / Mask R-CNN checkpoint (.pth or .pkl) to convert")
    weights.add_argument("--config", type=Path, help="YAML config of that model, e.g. configs/isbi_r50.yaml")
    weights.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (--from-detectron2)")
    weights.add_argument("--allow-partial", action="store_true",
                         help="convert despite unknown/missing/mis-shaped keys (all reported by name)")
    weights.add_argument("--allow-config-mismatch", action="store_true",
                         help="convert although the config's input format / mean / std / stride / norm differ "
                              "from detectron2's (the outputs will then differ from the authors')")
    weights.add_argument("--inspect-weights", type=Path, metavar="FILE",
                         help="print the format of a weights file and the config values it implies")
    args = p.parse_intermixed_args(argv)
    if args.overrides and not args.from_detectron2:
        p.error(f"unexpected arguments {' '.join(args.overrides)} (key=value overrides go with --from-detectron2)")
    modes = (args.dataset, args.from_labels, args.from_labelme, *instance_sources(args), args.from_detectron2,
             args.inspect_weights)
    if sum(x is not None for x in modes) > 1:
        p.error("use one of --dataset, --from-labels, --from-labelme, --from-imagej-rois, --from-geojson, "
                "--from-instance-stacks, --from-dsb2018, --from-detectron2, --inspect-weights")
    if args.from_detectron2 and (args.config is None or args.out is None):
        p.error("--from-detectron2 needs --config CONFIG (the model's YAML) and --out OUT.pth")
    if args.from_detectron2 or args.inspect_weights:
        return args
    converting = args.from_labels or args.from_labelme or any(instance_sources(args))
    if converting and args.out is None:
        p.error("the --from-* converters need --out DIR (the data set folder to write)")
    if (args.annotations_dir or args.category_from) and not any(instance_sources(args)):
        p.error("--annotations-dir and --category-from go with --from-imagej-rois, --from-geojson, "
                "--from-instance-stacks or --from-dsb2018")
    if converting:
        return args
    if args.dataset in PRESETS:
        json_path, images, variant, ws, ga, ol, target = PRESETS[args.dataset]
        args.json = args.json or Path(json_path)
        args.images = args.images or Path(images)
        args.variant = args.variant or variant
        args.window_size = args.window_size if args.window_size is not None else ws
        args.ga_factor = args.ga_factor if args.ga_factor is not None else ga
        args.overlap_hl = args.overlap_hl if args.overlap_hl is not None else ol
        args.target_category = args.target_category if args.target_category is not None else target
    elif args.dataset is None:
        missing = [f"--{k.replace('_', '-')}" for k in ("json", "images", "variant", "window_size",
                                                         "ga_factor", "overlap_hl", "target_category")
                   if getattr(args, k) is None]
        if missing:
            p.error(f"missing {' '.join(missing)} (or use --dataset with a preset: {', '.join(PRESETS)})")
    return args


INSTANCE_KINDS = {"from_imagej_rois": "imagej", "from_geojson": "geojson", "from_instance_stacks": "stacks",
                  "from_dsb2018": "dsb2018"}  # option -> gains.instance_converters kind


def instance_sources(args) -> list:
    """The values of the --from-* options of per-instance annotations (None where not given)."""
    return [getattr(args, option) for option in INSTANCE_KINDS]


def write_visualizations(records, store, out_dir: Path, k: int) -> int:
    import numpy as np

    from gains.gamm import gamm_masks
    from gains.imageio import read_image
    from gains.visualize import save_ga_figure

    written = 0
    for record in [r for r in records if r.annotations][:k]:
        ids = [a.id for a in record.annotations]
        maps = store.maps(record, ids)
        masks = gamm_masks([a.segmentation for a in record.annotations], record.height, record.width)
        save_ga_figure(read_image(record.path).numpy(), masks, np.asarray(maps),
                       out_dir / f"{record.image_id}.png",
                       title=f"image {record.image_id} ({record.path.name}), {len(ids)} instances")
        written += 1
    return written


def run_gamm(args) -> int:
    from gains.annotations import DataError, load_coco
    from gains.ga_manifest import prepare_map_folder
    from gains.ga_store import GAMapStore, GammParams, fill_map_folder

    params = GammParams(args.variant, args.window_size, args.ga_factor, args.overlap_hl, args.target_category)
    try:
        # check_pixels: a corrupt or truncated image is reported here (file, image id), not at training time
        records, categories, dropped = load_coco(args.json, args.images, check_pixels=True)
    except DataError as e:
        print(f"preprocess.py: error: {e}", file=sys.stderr)
        return 2
    if args.target_category not in categories.json_ids:
        print(f"preprocess.py: error: --target-category {args.target_category} is not a category of "
              f"{args.json} (ids {list(categories.json_ids)}: {list(categories.names)})", file=sys.stderr)
        return 2
    map_dir = (args.out or args.images) / params.folder_name
    store = GAMapStore(map_dir, params, on_the_fly=True, dtype=args.dtype, layout=args.layout)
    start = time.perf_counter()
    try:
        # the folder's manifest: maps of other parameters are refused, maps of changed annotations redone
        prepare_map_folder(store, records, overwrite=args.overwrite)
        summary = fill_map_folder(records, store, workers=args.workers, overwrite=args.overwrite)
    except DataError as e:  # maps that belong to other data or parameters (manifest, GAMapStore.missing)
        print(f"preprocess.py: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"GAMM {params.variant} ws={params.window_size} GA={params.ga_factor} ol={params.overlap_hl} "
          f"target={params.target_category_id} -> {map_dir}")
    print(f"  images: {summary['images']} ({summary['images_skipped']} already complete), "
          f"maps written: {summary['maps_written']}, time: {seconds:.1f} s"
          + (f", dropped annotations: {dropped}" if dropped else ""))
    for image_id, why in summary["failures"]:
        print(f"  FAILED image {image_id}: {why}", file=sys.stderr)
    if args.visualize:
        vis_dir = map_dir.parent / f"{map_dir.name}_vis"
        n = write_visualizations(records, store, vis_dir, args.visualize)
        print(f"  overlays: {n} PNG in {vis_dir}")
    return 1 if summary["failures"] else 0


def run_convert(args) -> int:
    from gains.annotations import DataError
    from gains.dataset_converters import convert_dsb2018_sample, convert_folder, describe_dataset
    from gains.instance_converters import convert_instance_folder

    try:
        if args.dataset == "dsb2018-sample":
            out = args.out or Path("data/dsb2018")
            convert_dsb2018_sample(out, overwrite=args.overwrite)
        elif any(instance_sources(args)):
            out = args.out
            option = next(o for o in INSTANCE_KINDS if getattr(args, o) is not None)
            convert_instance_folder(getattr(args, option), out, kind=INSTANCE_KINDS[option],
                                    annotations_dir=args.annotations_dir, split_ratios=args.split_ratios,
                                    category_from=args.category_from, category_name=args.category_name,
                                    overwrite=args.overwrite)
        else:
            out = args.out
            convert_folder(args.from_labels or args.from_labelme, out,
                           kind="labels" if args.from_labels else "labelme", labels_dir=args.labels_dir,
                           split_ratios=args.split_ratios, category_name=args.category_name,
                           overwrite=args.overwrite)
    except (DataError, FileExistsError, ValueError) as e:
        print(f"preprocess.py: error: {e}", file=sys.stderr)
        return 2
    print(f"data set written to {out}")
    for split, (images, instances) in describe_dataset(out).items():
        print(f"  {split}: {images} images, {instances} instances -> {out / split}.json, {out / split}/")
    return 0


def run_convert_weights(args) -> int:
    """--from-detectron2 / --inspect-weights: exit 0, 1 for a checkpoint that does not convert, 2 for a bad
    config."""
    from gains.config import load_config
    from gains.convert_checkpoint import convert_checkpoint, describe_weights_file
    from gains.errors import CheckpointError, ConfigError

    try:
        if args.inspect_weights:
            print(describe_weights_file(args.inspect_weights))
            return 0
        cfg = load_config(args.config, args.overrides)
        report, notes = convert_checkpoint(args.from_detectron2, args.out, cfg, allow_partial=args.allow_partial,
                                           allow_config_mismatch=args.allow_config_mismatch)
    except (ConfigError, CheckpointError) as e:
        print(f"preprocess.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(report.describe() + "\n" + "\n".join(notes))
    print(f"wrote {args.out}; evaluate it with: python evaluate.py --ckpt {args.out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_detectron2 or args.inspect_weights:
        return run_convert_weights(args)
    if args.dataset == "dsb2018-sample" or args.from_labels or args.from_labelme or any(instance_sources(args)):
        return run_convert(args)
    if args.dataset == "synthetic":
        from gains.synthetic import make_synthetic_dataset
        paths = make_synthetic_dataset(args.out or Path("data/synthetic"))
        print("synthetic data set:", ", ".join(f"{k}={v}" for k, v in paths.items()))
        return 0
    return run_gamm(args)


if __name__ == "__main__":
    sys.exit(main())
