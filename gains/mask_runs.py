"""Binary masks as runs of foreground pixels, with exact pairwise intersections (the metrics' workhorse).

A mask flattened along its contiguous axis is a few dozen runs [start, end) instead of H*W pixels: COCO
RLE is exactly that (column-major), and dense masks convert in one bit-packed pass. Intersections are
integer run arithmetic, so they are exact by construction and cost O(runs), not O(pixels): the speed of
the native AP comes from here (pycocotools' own IoU also works on runs).
"""
from __future__ import annotations

import numpy as np


class MaskRuns:
    """N binary masks of one image as foreground runs.

    Mask i owns runs ptr[i]:ptr[i+1] of `starts`/`ends` (int64, half-open, sorted, disjoint) in a
    flattened pixel order whose contiguous lines are `line` pixels long (H for COCO RLE's column-major
    order, W for row-major arrays); every mask has `size` = H*W pixels. All masks compared with each
    other must share one order.
    """

    def __init__(self, starts: np.ndarray, ends: np.ndarray, ptr: np.ndarray, line: int, size: int):
        self.starts, self.ends, self.ptr = starts, ends, ptr
        self.line, self.size = int(line), int(size)

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def _run_index(self, idx: np.ndarray):
        """Concatenated run indices of masks `idx`, and each selected mask's run count."""
        counts = np.diff(self.ptr)[idx]
        offset = np.repeat(self.ptr[:-1][idx] - np.cumsum(counts) + counts, counts)
        return offset + np.arange(counts.sum()), counts

    def take(self, idx) -> "MaskRuns":
        """The masks `idx` (int indices), in that order."""
        runs, counts = self._run_index(np.asarray(idx, dtype=np.int64))
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return MaskRuns(self.starts[runs], self.ends[runs], ptr, self.line, self.size)

    def areas(self) -> np.ndarray:
        """int64 [N] pixel counts."""
        upto = np.concatenate([[0], np.cumsum(self.ends - self.starts)])
        return upto[self.ptr[1:]] - upto[self.ptr[:-1]]

    def _boxes(self) -> np.ndarray:
        """int64 [N, 4] (line0, line1, offset0, offset1) inclusive; a run crossing lines spans them all."""
        n = self.line
        l0, l1 = self.starts // n, (self.ends - 1) // n
        o0 = np.where(l0 == l1, self.starts % n, 0)
        o1 = np.where(l0 == l1, (self.ends - 1) % n, n - 1)
        out = np.zeros((len(self), 4), dtype=np.int64)
        full = np.diff(self.ptr) > 0
        at = self.ptr[:-1][full]  # empty masks own no runs, so these segments are exactly the masks
        if len(at):
            for j, (v, reduce) in enumerate(((l0, np.minimum), (l1, np.maximum), (o0, np.minimum),
                                             (o1, np.maximum))):
                out[full, j] = reduce.reduceat(v, at)
        return out

    def intersections(self, other: "MaskRuns") -> np.ndarray:
        """Exact |self_i ∩ other_j|, int64 [len(self), len(other)].

        For each pair whose boxes touch, every run [s, e) of other_j asks how many pixels of self_i lie
        before e and before s: one binary search over all of self's runs laid end to end (mask i shifted
        by i * size), so the whole matrix takes a handful of vectorised calls.
        """
        out = np.zeros((len(self), len(other)), dtype=np.int64)
        a, b = self._boxes(), other._boxes()
        touch = ((a[:, None, 0] <= b[None, :, 1]) & (b[None, :, 0] <= a[:, None, 1])
                 & (a[:, None, 2] <= b[None, :, 3]) & (b[None, :, 2] <= a[:, None, 3]))
        touch &= (np.diff(self.ptr) > 0)[:, None] & (np.diff(other.ptr) > 0)[None, :]
        ia, ib = np.nonzero(touch)
        if len(ia) == 0:
            return out
        owner = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.ptr))
        run_start = self.starts + owner * self.size
        run_len = self.ends - self.starts
        earlier = np.concatenate([[0], np.cumsum(run_len)[:-1]])  # pixels in the runs before each run

        def pixels_before(x):
            i = np.searchsorted(run_start, x, side="right") - 1
            j = np.maximum(i, 0)
            return np.where(i >= 0, earlier[j] + np.clip(x - run_start[j], 0, run_len[j]), 0)

        runs, counts = other._run_index(ib)
        shift = np.repeat(ia * self.size, counts)
        per_run = pixels_before(other.ends[runs] + shift) - pixels_before(other.starts[runs] + shift)
        out[ia, ib] = np.add.reduceat(per_run, np.concatenate([[0], np.cumsum(counts)[:-1]]))
        return out


def empty_runs(line: int, size: int) -> MaskRuns:
    z = np.zeros(0, dtype=np.int64)
    return MaskRuns(z, z, np.zeros(1, dtype=np.int64), line, size)


def runs_from_dense(masks: np.ndarray, line: int) -> MaskRuns:
    """bool/uint8 [N, P] masks (flattened, lines of `line` pixels) -> MaskRuns.

    Bit-packed: a pixel starts or ends a run where it differs from its predecessor, which is one XOR
    of the packed words with themselves shifted by one bit; only words holding a change are unpacked.
    """
    n, size = masks.shape
    if n == 0:
        return empty_runs(line, size)
    words = size // 64 + 1  # at least one zero bit after the last pixel closes a final run
    packed = np.zeros((n, words * 8), dtype=np.uint8)
    bits = masks if masks.dtype == np.bool_ else masks != 0  # (`!= 0` on bool would cost a full pass)
    packed[:, : (size + 7) // 8] = np.packbits(bits, axis=1, bitorder="little")
    x = packed.view("<u8")
    carry = np.zeros_like(x)
    carry[:, 1:] = x[:, :-1] >> np.uint64(63)
    change = x ^ ((x << np.uint64(1)) | carry)
    mask_of_word, word = np.nonzero(change)
    changed = change[mask_of_word, word].view(np.uint8).reshape(-1, 8)  # byte j: bits 8j..8j+7
    k, byte = np.nonzero(changed)  # unpack only the bytes that hold a change
    kk, bit = np.nonzero(np.unpackbits(changed[k, byte][:, None], axis=1, bitorder="little"))
    k = k[kk]
    pos = word[k].astype(np.int64) * 64 + byte[kk] * 8 + bit
    owner = mask_of_word[k]  # changes alternate: run start, run end, start, ...
    ptr = np.concatenate([[0], np.cumsum(np.bincount(owner[::2], minlength=n))]).astype(np.int64)
    return MaskRuns(pos[0::2], pos[1::2], ptr, line, size)


def _segmented_cumsum(values: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting wherever the (non-decreasing) segment id changes."""
    if len(values) == 0:
        return values
    cs = np.cumsum(values)
    first = np.flatnonzero(np.concatenate([[True], segments[1:] != segments[:-1]]))
    return cs - np.repeat(cs[first] - values[first], np.diff(np.concatenate([first, [len(values)]])))


def _parse_counts(strings: list[bytes]):
    """COCO compressed RLE strings -> (run lengths int64 [T], owning string int64 [T]), vectorised.

    The format (pycocotools' rleToString): each count is little-endian 5-bit groups in characters
    48 + g, 0x20 meaning 'more groups follow' and 0x10 in the last group meaning negative; from the
    4th count on, the stored value is the difference to the count two places before.
    """
    raw = np.frombuffer(b"".join(strings), dtype=np.uint8).astype(np.int64) - 48
    last = (raw & 0x20) == 0
    first_char = np.flatnonzero(np.concatenate([[True], last[:-1]]))[: int(last.sum())]
    token = np.cumsum(last) - last
    k = np.arange(len(raw)) - first_char[token]
    value = np.add.reduceat((raw & 0x1F) << (5 * k), first_char) if len(raw) else raw
    n_chars = np.diff(np.concatenate([first_char, [len(raw)]]))
    value = np.where(raw[last] & 0x10, value - (np.int64(1) << (5 * n_chars)), value)
    owner = np.repeat(np.arange(len(strings)), [len(s) for s in strings])[first_char]
    pos = np.arange(len(value)) - np.searchsorted(owner, owner)  # index of the count in its string
    counts = value.copy()
    for parity in (0, 1):  # undo the delta coding: per parity, a running sum from index 2 (even) / 1 (odd)
        sel = np.flatnonzero((pos % 2 == parity) & (pos >= 1))
        counts[sel] = _segmented_cumsum(value[sel], owner[sel])
    return counts, owner


def runs_from_rles(rles: list[dict], height: int, width: int) -> MaskRuns:
    """COCO RLEs of one image ('counts' as compressed str/bytes or as an uncompressed list) -> MaskRuns
    in column-major order. Raises ValueError if the run lengths do not add up to height*width."""
    size = height * width
    if not rles:
        return empty_runs(height, size)
    if len({isinstance(r["counts"], list) for r in rles}) > 1:  # mixed encodings: parse one by one
        return concat([runs_from_rles([r], height, width) for r in rles])
    if isinstance(rles[0]["counts"], list):
        counts = np.array([x for r in rles for x in r["counts"]], dtype=np.int64)
        owner = np.repeat(np.arange(len(rles)), [len(r["counts"]) for r in rles])
    else:
        counts, owner = _parse_counts([r["counts"].encode() if isinstance(r["counts"], str) else r["counts"]
                                       for r in rles])
    totals = np.bincount(owner, weights=counts, minlength=len(rles))
    if (counts < 0).any() or (totals != size).any():
        raise ValueError(f"an RLE does not describe a {height}x{width} mask (its run lengths do not add up)")
    ends = _segmented_cumsum(counts, owner)
    pos = np.arange(len(counts)) - np.searchsorted(owner, owner)
    ones = (pos % 2 == 1) & (counts > 0)  # RLE alternates background, foreground, ...
    ptr = np.concatenate([[0], np.cumsum(np.bincount(owner[ones], minlength=len(rles)))]).astype(np.int64)
    return MaskRuns(ends[ones] - counts[ones], ends[ones], ptr, height, size)


def concat(parts: list[MaskRuns]) -> MaskRuns:
    """Masks of several MaskRuns (same order and size) in one."""
    offsets = np.cumsum([0] + [len(p.starts) for p in parts[:-1]])
    ptr = np.concatenate([[0]] + [p.ptr[1:] + o for p, o in zip(parts, offsets)]).astype(np.int64)
    starts = np.concatenate([p.starts for p in parts]).astype(np.int64)
    ends = np.concatenate([p.ends for p in parts]).astype(np.int64)
    return MaskRuns(starts, ends, ptr, parts[0].line, parts[0].size)
