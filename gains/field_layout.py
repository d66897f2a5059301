"""Where the nuclei of a synthetic field go (gains.synthetic_field): wobbly-ellipse outlines, grown in clusters
where each new nucleus touches (0.2..0.8 px gap) or overlaps (35..80 % of the smaller radius) an earlier
member, and their masks rasterised on each instance's box only (pycocotools, as the evaluator does).
Everything is drawn from the generator passed in; memory is O(sum of instance areas).
"""
from __future__ import annotations

import math

import numpy as np
import shapely
from pycocotools import mask as mask_utils

_N_VERTICES = 32
ASPECT = (0.7, 1.0)          # minor / major axis
WOBBLE = 0.06                # amplitude of the 2nd radial harmonic; the 3rd and 4th are weaker
MARGIN = 1.0                 # vertices stay >= 1 px inside the field, as in gains.synthetic
_TOUCH_GAP = (0.2, 0.8)      # px between touching outlines
_OVERLAP_DEPTH = (0.35, 0.8)  # how far (x smaller mean radius) an overlapping nucleus reaches into its partner
_OVERLAP_AREA = (0.03, 0.6)  # accepted shared pixels / smaller mask area: a real overlap, not a swallow
_TRIES = 30                  # placements tried around a cluster before the cluster is closed
_SEED_TRIES = 200            # positions tried for a cluster's first nucleus before giving up


def _outlines(rng: np.random.Generator, n: int, radius: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """n wobbly ellipses centred on the origin: (float64 [n, 32, 2] xy, mean radii float64 [n]).

    Semi-axes are r/sqrt(aspect) and r*sqrt(aspect), so the area is about pi r^2 whatever the aspect.
    """
    r = rng.uniform(radius[0], radius[1], n)
    aspect = rng.uniform(*ASPECT, n)
    angle = rng.uniform(0.0, np.pi, n)
    k = np.arange(2, 5)
    amp = rng.uniform(0.0, WOBBLE, (n, 3)) / (k - 1)  # higher harmonics weaker: smooth, no spikes
    phase = rng.uniform(0.0, 2.0 * np.pi, (n, 3))
    t = np.linspace(0.0, 2.0 * np.pi, _N_VERTICES, endpoint=False)
    wobble = 1.0 + (amp[:, :, None] * np.cos(k[None, :, None] * t + phase[:, :, None])).sum(1)  # [n, K]
    a, b = r / np.sqrt(aspect), r * np.sqrt(aspect)
    ex, ey = a[:, None] * wobble * np.cos(t), b[:, None] * wobble * np.sin(t)
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return np.stack([ex * c - ey * s, ex * s + ey * c], axis=-1), r


def snap(xy: np.ndarray) -> np.ndarray:
    """Round to 2 decimals and move values whose 5*x ends in .5 up by 0.01 px: float64, same shape.

    pycocotools scales vertices by 5 and truncates 5*x + 0.5; at those values the truncation hinges on the
    last bit of 5*x, which differs between x and x - offset. Elsewhere 5*x + 0.5 is >= 0.05 from an integer,
    so rasterising a shifted polygon in a small canvas gives exactly the full-size mask, shifted.
    """
    cents = np.rint(np.asarray(xy, dtype=np.float64) * 100.0).astype(np.int64)
    cents[cents % 20 == 10] += 1
    return cents / 100.0


def _support(outline: np.ndarray, u: np.ndarray) -> float:
    """How far the outline [K, 2] reaches from its centre in direction u (unit [2]): max of vertex . u."""
    return float((outline @ u).max())


def rasterise(polygon: np.ndarray, height: int, width: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """pycocotools' mask of a polygon [K, 2] in an H x W image, computed on a canvas around its box only.

    Returns ((x0, y0, x1, y1) exclusive box, bool [y1 - y0, x1 - x0] crop). The canvas reaches >= 1 px
    beyond the vertices so pycocotools' clipping at the image border never acts where it would not at full
    size.
    """
    x0 = max(int(math.floor(polygon[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(polygon[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(polygon[:, 0].max())) + 2, width)
    y1 = min(int(math.ceil(polygon[:, 1].max())) + 2, height)
    local = polygon - np.array([x0, y0], dtype=np.float64)  # exact: an integer shift of a 2-decimal value
    rle = mask_utils.frPyObjects([local.ravel().tolist()], y1 - y0, x1 - x0)
    return (x0, y0, x1, y1), mask_utils.decode(rle)[:, :, 0].astype(bool)


def shared_pixels(box_a, crop_a, box_b, crop_b) -> int:
    """Number of pixels two (box, crop) masks share."""
    x0, y0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x1, y1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if x1 <= x0 or y1 <= y0:
        return 0
    a = crop_a[y0 - box_a[1]:y1 - box_a[1], x0 - box_a[0]:x1 - box_a[0]]
    b = crop_b[y0 - box_b[1]:y1 - box_b[1], x0 - box_b[0]:x1 - box_b[0]]
    return int(np.count_nonzero(a & b))


class _Layout:
    """Nuclei placed so far, with a spatial hash of their centres for neighbour queries.

    The hash cell is wider than any two nuclei's boxes can reach, so the 3 x 3 cells around a point hold
    every nucleus whose box can meet a box centred there.
    """

    def __init__(self, height: int, width: int, reach: float):
        self.height, self.width = height, width
        self.cell = 2.0 * reach + 6.0
        self.grid: dict[tuple[int, int], list[int]] = {}
        self.centres: list[np.ndarray] = []
        self.polygons: list[np.ndarray] = []
        self.boxes: list[tuple] = []
        self.crops: list[np.ndarray] = []
        self.areas: list[int] = []
        self.shapes: list = []  # shapely polygons, for the touching gap

    def _key(self, centre) -> tuple[int, int]:
        return int(centre[0] // self.cell), int(centre[1] // self.cell)

    def near(self, centre) -> list[int]:
        kx, ky = self._key(centre)
        return [i for dx in (-1, 0, 1) for dy in (-1, 0, 1) for i in self.grid.get((kx + dx, ky + dy), ())]

    def candidate(self, outline: np.ndarray, centre: np.ndarray):
        """(polygon, box, crop) of an outline placed at centre, or None when a vertex leaves the field."""
        polygon = snap(outline + centre)
        if (polygon.min() < MARGIN or polygon[:, 0].max() > self.width - MARGIN
                or polygon[:, 1].max() > self.height - MARGIN):
            return None
        box, crop = rasterise(polygon, self.height, self.width)
        return polygon, box, crop

    def clashes(self, centre, box, crop, allowed: int = -1) -> bool:
        """Whether the mask shares a pixel with any placed nucleus other than `allowed`."""
        return any(i != allowed and shared_pixels(box, crop, self.boxes[i], self.crops[i])
                   for i in self.near(centre))

    def add(self, centre, polygon, box, crop) -> int:
        index = len(self.polygons)
        self.centres.append(centre)
        self.polygons.append(polygon)
        self.boxes.append(box)
        self.crops.append(crop)
        self.areas.append(int(np.count_nonzero(crop)))
        self.shapes.append(shapely.Polygon(polygon))
        self.grid.setdefault(self._key(centre), []).append(index)
        return index


def _place_seed(rng, layout: _Layout, outline: np.ndarray):
    """First nucleus of a cluster: a uniform position clear of every placed nucleus, or None."""
    reach = float(np.abs(outline).max()) + MARGIN + 0.01
    for _ in range(_SEED_TRIES):
        centre = rng.uniform([reach, reach], [layout.width - reach, layout.height - reach])
        cand = layout.candidate(outline, centre)
        if cand is not None and not layout.clashes(centre, cand[1], cand[2]):
            return centre, cand
    return None


def _place_touching(layout: _Layout, outline: np.ndarray, partner: int, u: np.ndarray, gap: float):
    """Outline touching `partner` on its side u, clear of every placed nucleus: (centre, candidate) or None.

    Placing the centre at support(partner, u) + support(new, -u) + gap separates the two outlines by a
    line normal to u; one step along -u by (true distance - gap) then closes the remaining gap, which stays
    >= gap because a step of length s changes the distance by at most s.
    """
    base = layout.centres[partner]
    partner_outline = layout.polygons[partner] - base
    centre = base + u * (_support(partner_outline, u) + _support(outline, -u) + gap)
    distance = shapely.distance(shapely.Polygon(outline + centre), layout.shapes[partner])
    if distance > gap + 0.05:
        centre = centre - u * (distance - gap)
    for widen in (0.0, 0.4, 0.8):  # pixel quantisation can still join the masks: back off a little
        moved = centre + u * widen
        cand = layout.candidate(outline, moved)
        if cand is None:
            return None
        if not layout.clashes(moved, cand[1], cand[2]):
            return moved, cand
        if layout.clashes(moved, cand[1], cand[2], allowed=partner):
            return None  # blocked by another nucleus: backing off from the partner will not help
    return None


def _place_overlapping(layout: _Layout, outline: np.ndarray, r_new: float, partner: int, r_partner: float,
                       u: np.ndarray, depth: float):
    """Outline reaching depth * min radius into `partner` and clear of every other nucleus, or None."""
    base = layout.centres[partner]
    partner_outline = layout.polygons[partner] - base
    reach = _support(partner_outline, u) + _support(outline, -u) - depth * min(r_new, r_partner)
    centre = base + u * reach
    cand = layout.candidate(outline, centre)
    if cand is None or layout.clashes(centre, cand[1], cand[2], allowed=partner):
        return None
    shared = shared_pixels(cand[1], cand[2], layout.boxes[partner], layout.crops[partner])
    smaller = min(layout.areas[partner], int(np.count_nonzero(cand[2])))
    if not _OVERLAP_AREA[0] * smaller <= shared <= _OVERLAP_AREA[1] * smaller:
        return None
    return centre, cand


def place_nuclei(rng: np.random.Generator, height: int, width: int, num_instances: int, radius, overlap_fraction,
            cluster_size) -> tuple[_Layout, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Grow clusters until num_instances nuclei are placed.

    Returns (layout, partner int64 [N], cluster int64 [N], overlapping pairs). The overlap budget is spent
    with probability (pairs still wanted) / (nuclei still to place), so the count lands close to the target
    even when some tries fail.
    """
    outlines, radii = _outlines(rng, num_instances, radius)
    reach = float(np.abs(outlines).max(initial=0.0)) * math.sqrt(2.0) + 2.0
    layout = _Layout(height, width, reach)
    partner = np.full(num_instances, -1, dtype=np.int64)
    cluster = np.zeros(num_instances, dtype=np.int64)
    pairs: list[tuple[int, int]] = []
    in_pair = np.zeros(num_instances, dtype=bool)
    wanted_pairs = int(round(overlap_fraction * num_instances / 2.0))
    members: list[int] = []
    cluster_target, cluster_index = 0, -1
    for k in range(num_instances):
        placed = None
        if len(members) < cluster_target:
            want_overlap = rng.random() < (wanted_pairs - len(pairs)) / (num_instances - k)
            placed = _grow(rng, layout, outlines[k], radii, members, in_pair, want_overlap)
        if placed is None:  # cluster full or closed: start a new one
            cluster_index += 1
            cluster_target = int(rng.integers(cluster_size[0], cluster_size[1] + 1))
            members = []
            seed = _place_seed(rng, layout, outlines[k])
            if seed is None:
                raise ValueError(
                    f"could only place {k} of {num_instances} nuclei (radius {radius[0]:g}..{radius[1]:g} px) "
                    f"in the {height}x{width} field; use a larger field or fewer or smaller nuclei")
            placed = (-1, False, *seed)
        j, overlapping, centre, (polygon, box, crop) = placed
        index = layout.add(centre, polygon, box, crop)
        partner[index], cluster[index] = j, cluster_index
        if overlapping:
            pairs.append((j, index))
            in_pair[[j, index]] = True
        members.append(index)
    return layout, partner, cluster, pairs


def _grow(rng, layout, outline, radii, members, in_pair, want_overlap):
    """Try to attach the next nucleus to its cluster: (partner, overlapping, centre, candidate) or None."""
    k = len(layout.polygons)
    for _ in range(_TRIES):
        u = rng.uniform(0.0, 2.0 * np.pi)
        u = np.array([math.cos(u), math.sin(u)])
        free = [m for m in members if not in_pair[m]]
        if want_overlap and free:
            j = free[int(rng.integers(len(free)))]
            got = _place_overlapping(layout, outline, radii[k], j, radii[j], u, rng.uniform(*_OVERLAP_DEPTH))
        else:
            j = members[int(rng.integers(len(members)))]
            got = _place_touching(layout, outline, j, u, rng.uniform(*_TOUCH_GAP))
        if got is not None:
            return j, want_overlap and bool(free), *got
    return None
