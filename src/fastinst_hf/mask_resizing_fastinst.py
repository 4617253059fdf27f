"""The exact mask upsampling of FastInst's post-processing: stride-8 mask logits -> binary masks at the target size.

The official inference upsamples every mask bilinearly to the padded input size, crops the resized image and resizes
bilinearly to the target size ([`resize_mask_logits`]). [`iter_binary_masks`] gives the same binary masks: on CPU it
evaluates only the output tiles where a mask pixel can be, with torch's own float32 arithmetic (bit-identical masks),
and elsewhere it resizes densely.
"""

import collections
import math

import numpy as np
import torch
from torch.nn import functional as F

# The mask logits of FastInst are predicted at stride 8 of the padded input.
MASK_STRIDE = 8

# Dense path (GPU, or where the tiled path is not exact): masks are upsampled in chunks of about this many pixels, so a
# chunk stays in the CPU cache and the float masks never exist at the target size for all kept queries at once.
CHUNK_PIXELS = 1_300_000
# Tiled path (CPU): boolean masks are made for about this many pixels at a time; float values only exist for
# TILE_BATCH tiles of MASK_TILE x MASK_TILE pixels at a time.
TILED_CHUNK_PIXELS = 1 << 25
MASK_TILE = 32
TILE_BATCH = 1024
# The probe of a new size checks every output row and column twice plus PROBE_PIXELS random pixels. It costs about
# two masks resized densely plus a few milliseconds, so it only runs where (masks - 2) x (padded + output pixels)
# reaches PROBE_BREAK_EVEN (measured with scripts/measure_mask_probe.py); the last PROBED_SIZES answers are kept.
PROBE_PIXELS = 4096
PROBE_BREAK_EVEN = 2_000_000
PROBED_SIZES = 16


def _bilinear_taps(in_size: int, out_size: int, fused: bool) -> tuple[torch.Tensor, ...]:
    """
    Source indices and weights of torch's bilinear resizing (align_corners=False) along one axis, computed in float32
    the way its CPU kernel does (clamped at both ends; `fused`: `scale * (o + 0.5) - 0.5` as one fma, see `_lerp`):
    `(i0, i1, w0, w1)`, each `(out_size,)`; output `o` is `input[i0[o]] * w0[o] + input[i1[o]] * w1[o]`.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    centres = torch.arange(out_size, dtype=torch.float32) + 0.5
    # Both products are exact in float64, so its sum rounded to float32 is the fma.
    source = (scale.double() * centres.double() - 0.5).float() if fused else scale * centres - 0.5
    source.clamp_(min=0)
    i0 = source.floor().long().clamp_(max=in_size - 1)
    w1 = (source - i0).clamp_(0, 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, 1 - w1, w1


def _lerp(first, second, w0, w1, fused: bool) -> torch.Tensor:
    """torch's bilinear step `first * w0 + second * w1`. Its AVX2 CPU build fuses the first product into the sum (one
    rounding: `fma(first, w0, second * w1)`), emulated exactly in float64 when `fused`."""
    if fused:
        return (first.double() * w0.double() + (second * w1).double()).float()
    return first * w0 + second * w1


class _Axis:
    """
    One axis of the official mask resizing: stride-8 logits (`size`) -> bilinear to the padded input (`8 * size`),
    crop to `resized`, bilinear to `output`. Holds the taps of both steps (for exact values at given pixels) and, per
    tile of `tile` output pixels, the window of logits it depends on and the composite float32 weights of the two
    steps (for approximate values of whole tiles with two small matrix products).
    """

    def __init__(self, size: int, resized: int, output: int, tile: int, fused: bool):
        self.first = _bilinear_taps(size, size * MASK_STRIDE, fused)
        self.second = _bilinear_taps(resized, output, fused)
        # Composite weights `(output, size)`: row o mixes the logit rows that output o depends on.
        first = torch.zeros(size * MASK_STRIDE, size, dtype=torch.float64)
        i0, i1, w0, w1 = self.first
        rows = torch.arange(len(i0))
        first.index_put_((rows, i0), w0.double(), accumulate=True).index_put_((rows, i1), w1.double(), accumulate=True)
        j0, j1, v0, v1 = self.second
        weights = v0.double()[:, None] * first[j0] + v1.double()[:, None] * first[j1]
        self.num_tiles = -(-output // tile)
        starts = torch.arange(self.num_tiles) * tile
        ends = (starts + tile).clamp(max=output) - 1
        self.window_start = i0[j0[starts]]
        self.window = int((i1[j1[ends]] - self.window_start).max()) + 1
        # Tile t, pixel k, window row r: logit row window_start[t] + r (past the end: weight 0, index clamped).
        window_rows = self.window_start[:, None] + torch.arange(self.window)
        pixels = (starts[:, None] + torch.arange(tile)).clamp(max=output - 1)
        self.tile_weights = weights[pixels[:, :, None], window_rows.clamp(max=size - 1)[:, None, :]]
        self.tile_weights *= (window_rows < size)[:, None, :]
        self.tile_weights = self.tile_weights.float()
        self.window_rows = window_rows.clamp(max=size - 1)
        self.valid = starts[:, None] + torch.arange(tile) < output


def _resample(taps, positions: torch.Tensor, lookup, fused: bool) -> torch.Tensor:
    """One bilinear step at output `positions` of one axis; `lookup(indices)` gives the input values there."""
    i0, i1, w0, w1 = (tap[positions] for tap in taps)
    return _lerp(lookup(i0), lookup(i1), w0, w1, fused)


def _exact_mask_logits(logits, maps, ys, xs, rows: _Axis, cols: _Axis, fused: bool) -> torch.Tensor:
    """
    `(P,)` resized mask logits at the pixels `(maps, ys, xs)` of `(U, h, w)` stride-8 `logits`, bit-identical to
    `F.interpolate` to the padded size then to the output size (each step: height outer, width inner, as torch).
    """

    def padded(ys_padded, xs_padded):
        def row(h):
            return _resample(cols.first, xs_padded, lambda c: logits[maps, h, c], fused)

        return _resample(rows.first, ys_padded, row, fused)

    return _resample(rows.second, ys, lambda y: _resample(cols.second, xs, lambda x: padded(y, x), fused), fused)


def resize_mask_logits(mask_logits: torch.Tensor, resized_size, output_size) -> torch.Tensor:
    """`(n, h, w)` stride-8 mask logits -> `(n, *output_size)`: the official bilinear upsampling to the padded input
    size, crop to `resized_size`, bilinear to `output_size` (skipped when equal: resizing to the same size is the
    identity)."""
    padded_size = (mask_logits.shape[-2] * MASK_STRIDE, mask_logits.shape[-1] * MASK_STRIDE)
    logits = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
    logits = logits[..., : resized_size[0], : resized_size[1]]
    if tuple(logits.shape[-2:]) != tuple(output_size):
        logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
    return logits[0]


def _probe_pixels(shape: tuple[int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ys, xs)` of the pixels the probe checks: every output row and every output column twice (each has its own
    taps, and torch's vectorised kernel leaves the last columns of a row to scalar code), plus random pixels."""
    height, width = shape
    ys = torch.cat(
        [torch.arange(height).repeat(2), torch.randint(height, (2 * width + PROBE_PIXELS,), generator=generator)]
    )
    xs = torch.cat(
        [
            torch.randint(width, (2 * height,), generator=generator),
            torch.arange(width).repeat(2),
            torch.randint(width, (PROBE_PIXELS,), generator=generator),
        ]
    )
    return ys, xs


def _exact_axes(logit_size, resized_size, output_size) -> tuple[_Axis, _Axis, bool] | None:
    """
    `(rows, cols, fused)` with which [`_exact_mask_logits`] reproduces [`resize_mask_logits`] bit for bit at these sizes
    on this CPU, or None. Checked on one random mask (see [`_probe_pixels`]), because torch's kernel rounds
    differently with its build (fused multiply-adds) and for small outputs (another kernel).
    """
    generator = torch.Generator().manual_seed(0)
    probe = 4 * torch.randn(1, *logit_size, generator=generator)
    reference = resize_mask_logits(probe, resized_size, output_size)[0]
    ys, xs = _probe_pixels(tuple(output_size), generator)
    maps = torch.zeros_like(ys)
    for fused in (True, False):
        rows = _Axis(logit_size[0], resized_size[0], output_size[0], MASK_TILE, fused)
        cols = _Axis(logit_size[1], resized_size[1], output_size[1], MASK_TILE, fused)
        if torch.equal(_exact_mask_logits(probe, maps, ys, xs, rows, cols, fused), reference[ys, xs]):
            return rows, cols, fused
    return None


_PROBED: collections.OrderedDict = collections.OrderedDict()


def _probed_axes(sizes: tuple, num_masks: int) -> tuple[_Axis, _Axis, bool] | None:
    """[`_exact_axes`] of `sizes` = `(logit_size, resized_size, output_size)`, remembered for the last
    `PROBED_SIZES` sizes. On a new size the probe only runs where it pays off (see `PROBE_BREAK_EVEN`), so that a
    first call is not slower than the dense path; otherwise None (the dense path)."""
    if sizes in _PROBED:
        _PROBED.move_to_end(sizes)
        return _PROBED[sizes]
    (logit_height, logit_width), _, (height, width) = sizes
    dense_pixels = logit_height * logit_width * MASK_STRIDE**2 + height * width
    if (num_masks - 2) * dense_pixels < PROBE_BREAK_EVEN:
        return None
    _PROBED[sizes] = _exact_axes(*sizes)
    if len(_PROBED) > PROBED_SIZES:
        _PROBED.popitem(last=False)
    return _PROBED[sizes]


def _tile_bounds(logits: torch.Tensor, rows: _Axis, cols: _Axis) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n, tile rows, tile cols)` minima and maxima of the logits each output tile depends on: bilinear values are
    convex combinations, so every pixel of a tile lies between them (up to rounding)."""
    windows = logits[:, rows.window_rows]  # (n, tile rows, window, w)
    row_minima, row_maxima = windows.amin(2), windows.amax(2)
    return row_minima[:, :, cols.window_rows].amin(3), row_maxima[:, :, cols.window_rows].amax(3)


def _tile_valid(tile_ys, tile_xs, rows: _Axis, cols: _Axis) -> torch.Tensor:
    """`(T, MASK_TILE, MASK_TILE)` bool: which pixels of tiles `(tile_ys, tile_xs)` lie inside the output."""
    return rows.valid[tile_ys][:, :, None] & cols.valid[tile_xs][:, None, :]


def _tile_values(logits, maps, tile_ys, tile_xs, rows: _Axis, cols: _Axis) -> torch.Tensor:
    """`(T, MASK_TILE, MASK_TILE)` resized logits of tiles `(maps, tile_ys, tile_xs)`, approximately: two small matrix
    products with the composite weights of the two bilinear steps."""
    patches = logits[maps[:, None, None], rows.window_rows[tile_ys][:, :, None], cols.window_rows[tile_xs][:, None, :]]
    return rows.tile_weights[tile_ys] @ (patches @ cols.tile_weights[tile_xs].transpose(1, 2))


def _tile_probabilities(logits, maps, tile_ys, tile_xs, rows: _Axis, cols: _Axis, fused, limit, margin):
    """`(T, MASK_TILE, MASK_TILE)` sigmoid of the resized logits of tiles `(maps, tile_ys, tile_xs)`: the approximate
    values, then the exact ones (torch's arithmetic) where the approximation is within `margin` of the logit `limit`
    of the mask threshold, so that thresholding them gives torch's masks."""
    values = _tile_values(logits, maps, tile_ys, tile_xs, rows, cols)
    valid = _tile_valid(tile_ys, tile_xs, rows, cols)
    tiles, ys, xs = torch.nonzero(valid & ((values - limit).abs_() <= margin), as_tuple=True)
    ys, xs = tile_ys[tiles] * MASK_TILE + ys, tile_xs[tiles] * MASK_TILE + xs
    values[tiles, ys % MASK_TILE, xs % MASK_TILE] = _exact_mask_logits(logits, maps[tiles], ys, xs, rows, cols, fused)
    return values.sigmoid_(), valid


def _batches(*indices: torch.Tensor):
    for start in range(0, len(indices[0]), TILE_BATCH):
        yield tuple(index[start : start + TILE_BATCH] for index in indices)


def _tiled_binary_masks(logits: torch.Tensor, axes, output_size, mask_threshold: float):
    """[`iter_binary_masks`] for one chunk of `(n, h, w)` logits, computing only the tiles where a pixel can pass
    the threshold: `(masks, mask_scores, areas)`. Tiles whose every pixel passes it by more than the margin (inside
    a mask) need no exact values and no thresholding, only the sum of their probabilities."""
    rows, cols, fused = axes
    threshold = float(np.float32(mask_threshold))  # what `probs > mask_threshold` compares with
    limit = math.log(threshold / (1 - threshold))
    # Covers the approximation's rounding and the float32 sigmoid's (whose slope at the limit is t * (1 - t)).
    margin = 1e-4 * (1 + logits.abs().max().item()) + 1e-5 / (threshold * (1 - threshold))
    minima, maxima = _tile_bounds(logits, rows, cols)
    inside = minima > limit + margin
    padded = torch.zeros(len(logits), rows.num_tiles * MASK_TILE, cols.num_tiles * MASK_TILE, dtype=torch.bool)
    tiles = padded.view(len(logits), rows.num_tiles, MASK_TILE, cols.num_tiles, MASK_TILE).transpose(2, 3)
    sums = torch.zeros(len(logits), dtype=torch.float64)
    areas = torch.zeros(len(logits), dtype=torch.long)
    for batch in _batches(*torch.nonzero((maxima > limit - margin) & ~inside, as_tuple=True)):
        probs, valid = _tile_probabilities(logits, *batch, rows, cols, fused, limit, margin)
        masks = (probs > mask_threshold) & valid
        tiles[batch] = masks
        sums.index_add_(0, batch[0], probs.mul_(masks).flatten(1).sum(1).double())
        areas.index_add_(0, batch[0], masks.flatten(1).sum(1))
    for batch in _batches(*torch.nonzero(inside, as_tuple=True)):
        probs = _tile_values(logits, *batch, rows, cols).sigmoid_()
        valid = _tile_valid(batch[1], batch[2], rows, cols)
        tiles[batch] = valid
        sums.index_add_(0, batch[0], probs.mul_(valid).flatten(1).sum(1).double())
        areas.index_add_(0, batch[0], valid.flatten(1).sum(1))
    return padded[:, : output_size[0], : output_size[1]], (sums / (areas + 1e-6)).float(), areas


def iter_binary_masks(
    mask_logits: torch.Tensor,
    resized_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_threshold: float,
    chunk_pixels: int | None = None,
):
    """
    Official mask upsampling of `(N, h, w)` stride-8 mask logits (see [`resize_mask_logits`]), sigmoid,
    `> mask_threshold`, a chunk of masks at a time. On CPU, where [`_exact_mask_logits`] matches torch's kernel, only
    the tiles that can hold mask pixels are resized (the same masks, several times faster; a new size is probed first,
    see [`_probed_axes`]); otherwise the chunk is resized densely.

    Yields:
        `(start, masks, mask_scores, areas)`: masks `start : start + n` as `(n, *output_size)` bool, their `(n,)` mask
        scores `sum(p * mask) / (sum(mask) + 1e-6)` and their `(n,)` areas `sum(mask)`.
    """
    threshold = float(np.float32(mask_threshold))
    axes = None
    if mask_logits.device.type == "cpu" and mask_logits.dtype == torch.float32 and 0 < threshold < 1:
        sizes = (tuple(mask_logits.shape[-2:]), tuple(resized_size), tuple(output_size))
        axes = _probed_axes(sizes, len(mask_logits))
    if chunk_pixels is None:
        chunk_pixels = CHUNK_PIXELS if axes is None else TILED_CHUNK_PIXELS
    # The dense path also holds the float masks at the padded size; the tiled path only the bool output.
    padded_pixels = 0 if axes else mask_logits.shape[-2] * mask_logits.shape[-1] * MASK_STRIDE**2
    chunk = max(1, chunk_pixels // max(padded_pixels, output_size[0] * output_size[1]))
    for start in range(0, mask_logits.shape[0], chunk):
        logits = mask_logits[start : start + chunk]
        if axes is not None:
            yield start, *_tiled_binary_masks(logits, axes, output_size, mask_threshold)
            continue
        probs = resize_mask_logits(logits, resized_size, output_size).contiguous().sigmoid_()
        masks = probs > mask_threshold
        areas = torch.count_nonzero(masks.flatten(1), dim=1)
        yield start, masks, probs.masked_fill_(~masks, 0).flatten(1).sum(1) / (areas + 1e-6), areas


__all__ = ["MASK_STRIDE", "iter_binary_masks", "resize_mask_logits"]
