"""Batched, per-image augmentation for uint8 image batches (``N x C x H x W``, C = 1 or 3).

Noisy Student needs real per-sample noise on the student, and the batches already live on
the training device, so every op here takes per-image parameters (tensors of shape ``N``,
or one scalar for all), runs on the batch's device and has no per-image Python loop, so
its cost per batch hardly grows with the batch size.

Randomness comes only from torch's RNG (the global one, or an explicit ``torch.Generator``)
so a run is reproducible after ``torch.manual_seed``. Geometric ops use pixel coordinates
with pixel centres on integers (x = column, y = row, as in OpenCV) and fill with 0. The
RandAugment ops compute what torchvision's ``v2.RandAugment`` computes for one image
(rotations may resolve exact nearest-neighbour ties the other way).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as NF
from torchvision.transforms.v2 import functional as TF

# (uint8 images N x C x H x W on any device, float targets N x K)
#   -> (float images in [0, 1] on the same device, float targets N x K)
Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# A per-image parameter: a tensor of shape N, or one number for the whole batch.
Param = torch.Tensor | float

POLICIES = ("none", "weak", "classic", "strong")


# --------------------------------------------------------------------------- randomness


def _rand(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform [0, 1) drawn on the generator's device (a CPU generator stays usable for CUDA
    batches), then moved next to the batch."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=source).to(device)


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=source).to(device)


def _beta(
    alpha: float, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``n`` draws of Beta(alpha, alpha); ``torch.distributions.Beta`` takes no generator, the
    Dirichlet sampler underneath it does (and stays finite for small alpha)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    source = generator.device if generator is not None else device
    concentration = torch.full((n, 2), float(alpha), device=source)
    return torch._sample_dirichlet(concentration, generator=generator)[:, 0].to(device)


def _vector(value: Param, n: int, device: torch.device) -> torch.Tensor:
    """A scalar or per-image parameter as a float32 vector of length ``n`` on ``device``."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).expand(n)


def _per_image(value: Param, batch: torch.Tensor) -> torch.Tensor:
    """A scalar or per-image parameter shaped ``N x 1 x 1 x 1`` to broadcast over a batch."""
    return _vector(value, batch.shape[0], batch.device).reshape(-1, 1, 1, 1)


# ------------------------------------------------------------------------- pixel ops


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 255] and truncate, as torchvision's uint8 colour ops do."""
    return values.clamp_(0, 255).to(torch.uint8)


def _blend(batch: torch.Tensor, degenerate: torch.Tensor, factor: Param) -> torch.Tensor:
    """``factor * batch + (1 - factor) * degenerate``: 0 gives the degenerate image, 1 the
    input, above 1 extrapolates away from it."""
    # 1 - factor in float64, then both weights in float32: as torchvision does with a scalar
    f = torch.as_tensor(factor, dtype=torch.float64, device=batch.device)
    f = f.expand(batch.shape[0]).reshape(-1, 1, 1, 1)
    return _to_uint8(torch.addcmul(batch.float() * f.float(), degenerate, (1 - f).float()))


def brightness_add(batch: torch.Tensor, delta: Param) -> torch.Tensor:
    """Add ``delta`` to every pixel of each image, rounded and clipped to [0, 255]."""
    return (batch.float() + _per_image(delta, batch)).round_().clamp_(0, 255).to(torch.uint8)


def brightness_mul(batch: torch.Tensor, factor: Param) -> torch.Tensor:
    """Multiply each image by ``factor`` and clip (torchvision's ``adjust_brightness``)."""
    return _to_uint8(batch.float() * _per_image(factor, batch))


def contrast(batch: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend each image with its mean grey level (torchvision's ``adjust_contrast``)."""
    grey = TF.rgb_to_grayscale(batch) if batch.shape[1] == 3 else batch
    return _blend(batch, grey.float().mean(dim=(1, 2, 3), keepdim=True), factor)


def color(batch: torch.Tensor, factor: Param) -> torch.Tensor:
    """Saturation: blend each image with its greyscale version (``adjust_saturation``);
    a no-op on 1-channel images, which have no colour to change."""
    if batch.shape[1] == 1:
        return batch
    return _blend(batch, TF.rgb_to_grayscale(batch).float(), factor)


def sharpness(batch: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend the interior of each image with a smoothed copy (``adjust_sharpness``: 3x3
    kernel of ones with 5 in the middle, over 13); factor 0 blurs, 1 keeps, 2 sharpens.
    The one-pixel border is left as it is."""
    if batch.shape[-2] <= 2 or batch.shape[-1] <= 2:
        return batch
    out = batch.float()
    # Integer box sums by shifted slices: exact, and far cheaper than a grouped conv2d here.
    rows = out[..., :-2] + out[..., 1:-1] + out[..., 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    inner = out[..., 1:-1, 1:-1]
    blurred = ((box + 4 * inner) / 13).round_()
    inner.add_((blurred - inner) * (1 - _per_image(factor, batch)))
    return _to_uint8(out)


def posterize(batch: torch.Tensor, bits: Param) -> torch.Tensor:
    """Keep the ``bits`` most significant bits (0-8) of every pixel of each image."""
    keep = _per_image(bits, batch).round().clamp(0, 8)
    mask = (256 - torch.exp2(8 - keep)).to(torch.uint8)
    return batch & mask


def solarize(batch: torch.Tensor, threshold: Param) -> torch.Tensor:
    """Invert the pixels at or above each image's ``threshold`` (0-255)."""
    return torch.where(batch >= _per_image(threshold, batch), 255 - batch, batch)


def equalize(batch: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each channel of each image (torchvision computes it per image)."""
    return TF.equalize(batch)


def autocontrast(batch: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to the full [0, 255] range."""
    return TF.autocontrast(batch)


def hflip(batch: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror left-right the images where ``mask`` (bool, shape N) is set; all if None."""
    flipped = TF.horizontal_flip(batch)
    return flipped if mask is None else torch.where(mask.reshape(-1, 1, 1, 1), flipped, batch)


def vflip(batch: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror top-bottom the images where ``mask`` (bool, shape N) is set; all if None."""
    flipped = TF.vertical_flip(batch)
    return flipped if mask is None else torch.where(mask.reshape(-1, 1, 1, 1), flipped, batch)


def cutout(
    batch: torch.Tensor, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero a ``size x size`` square per image at a random centre (clipped at the border)."""
    n, _, height, width = batch.shape
    top = _randint(height, (n,), generator, batch.device) - size // 2
    left = _randint(width, (n,), generator, batch.device) - size // 2
    rows = torch.arange(height, device=batch.device)
    cols = torch.arange(width, device=batch.device)
    inside = _box_mask(rows, cols, top, top + size, left, left + size)
    return batch.masked_fill(inside, 0)


def _box_mask(
    rows: torch.Tensor,
    cols: torch.Tensor,
    top: torch.Tensor,
    bottom: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
) -> torch.Tensor:
    """``N x 1 x H x W`` mask of the per-image boxes ``[top, bottom) x [left, right)``."""
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


# --------------------------------------------------------------------- geometric ops


def affine_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The ``2 x 3`` affine matrix that maps three source points exactly onto three
    destinations (``... x 3 x 2`` each, batched over leading dims), solved in float64:
    ``[x y 1] @ M.T = [x' y']`` for each pair."""
    dtype = torch.promote_types(torch.promote_types(src.dtype, dst.dtype), torch.float32)
    src64, dst64 = src.double(), dst.to(device=src.device, dtype=torch.float64)
    design = torch.cat([src64, torch.ones_like(src64[..., :1])], dim=-1)
    return torch.linalg.solve(design, dst64).transpose(-1, -2).to(dtype)


def _sample(
    batch: torch.Tensor, x_src: torch.Tensor, y_src: torch.Tensor, mode: str
) -> torch.Tensor:
    """Read every output pixel from source pixel coordinates ``(x_src, y_src)`` (broadcast to
    ``N x H x W``) with ``grid_sample`` (0 outside the image), rounded back to uint8.

    The grid is built by broadcasting instead of ``affine_grid``, whose ``k = 3`` bmm costs
    about ten times the sampling itself on CPU."""
    _, _, height, width = batch.shape
    gx, gy = torch.broadcast_tensors((2 * x_src + 1) / width - 1, (2 * y_src + 1) / height - 1)
    grid = torch.stack([gx, gy], dim=-1)
    sampled = NF.grid_sample(batch.float(), grid, mode=mode, align_corners=False)
    return _to_uint8(sampled.round_())


def _pixel_axes(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output pixel coordinates shaped to broadcast: ``x`` as ``1 x 1 x W``, ``y`` as
    ``1 x H x 1``."""
    _, _, height, width = batch.shape
    xs = torch.arange(width, device=batch.device, dtype=torch.float32)
    ys = torch.arange(height, device=batch.device, dtype=torch.float32)
    return xs[None, None, :], ys[None, :, None]


def warp_affine(
    batch: torch.Tensor, matrices: torch.Tensor, interpolation: str = "nearest"
) -> torch.Tensor:
    """Apply one forward affine map per image (``N x 2 x 3``, source pixel -> destination
    pixel, like ``cv2.warpAffine``) in a single ``grid_sample``; uncovered pixels are 0.
    ``interpolation`` is ``"nearest"`` or ``"bilinear"``. The matrices are inverted
    analytically, so nothing waits on the device."""
    n = batch.shape[0]
    m = matrices.to(device=batch.device, dtype=torch.float32).reshape(n, 6, 1, 1)
    a, b, tx, c, d, ty = m.unbind(dim=1)
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    xs, ys = _pixel_axes(batch)
    x_src = ia * (xs - tx) + ib * (ys - ty)
    y_src = ic * (xs - tx) + id_ * (ys - ty)
    return _sample(batch, x_src, y_src, interpolation)


def _matrix(
    a: torch.Tensor,
    b: torch.Tensor,
    tx: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    ty: torch.Tensor,
) -> torch.Tensor:
    return torch.stack([a, b, tx, c, d, ty], dim=-1).reshape(-1, 2, 3)


def _shear_x_matrix(factor: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(factor), torch.ones_like(factor)
    return _matrix(one, -factor, -0.5 * factor, zero, one, zero)


def _shear_y_matrix(factor: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(factor), torch.ones_like(factor)
    return _matrix(one, zero, zero, -factor, one, -0.5 * factor)


def _translation_matrix(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(dx), torch.ones_like(dx)
    return _matrix(one, zero, dx, zero, one, dy)


def _rotation_matrix(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    radians = torch.deg2rad(degrees)
    cos, sin = torch.cos(radians), torch.sin(radians)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return _matrix(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def rotate(batch: torch.Tensor, degrees: Param, interpolation: str = "nearest") -> torch.Tensor:
    """Rotate each image counter-clockwise by ``degrees`` about its centre."""
    n, _, height, width = batch.shape
    matrices = _rotation_matrix(_vector(degrees, n, batch.device), height, width)
    return warp_affine(batch, matrices, interpolation)


def shear_x(batch: torch.Tensor, factor: Param, interpolation: str = "nearest") -> torch.Tensor:
    """Shift each row by ``-factor`` times its distance from the top edge,
    ``x' = x - factor * (y + 0.5)`` (torchvision's ShearX at magnitude ``factor``)."""
    matrices = _shear_x_matrix(_vector(factor, batch.shape[0], batch.device))
    return warp_affine(batch, matrices, interpolation)


def shear_y(batch: torch.Tensor, factor: Param, interpolation: str = "nearest") -> torch.Tensor:
    """Shift each column by ``-factor`` times its distance from the left edge,
    ``y' = y - factor * (x + 0.5)`` (torchvision's ShearY at magnitude ``factor``)."""
    matrices = _shear_y_matrix(_vector(factor, batch.shape[0], batch.device))
    return warp_affine(batch, matrices, interpolation)


def translate_x(batch: torch.Tensor, pixels: Param, interpolation: str = "nearest") -> torch.Tensor:
    """Shift each image right by ``pixels`` (left if negative), filling with 0."""
    dx = _vector(pixels, batch.shape[0], batch.device)
    return warp_affine(batch, _translation_matrix(dx, torch.zeros_like(dx)), interpolation)


def translate_y(batch: torch.Tensor, pixels: Param, interpolation: str = "nearest") -> torch.Tensor:
    """Shift each image down by ``pixels`` (up if negative), filling with 0."""
    dy = _vector(pixels, batch.shape[0], batch.device)
    return warp_affine(batch, _translation_matrix(torch.zeros_like(dy), dy), interpolation)


def perspective(
    batch: torch.Tensor,
    startpoints: torch.Tensor,
    endpoints: torch.Tensor,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Per-image projective warp moving four ``startpoints`` onto ``endpoints``
    (``N x 4 x 2`` pixel coordinates each): the eight homography coefficients of all images
    are solved in one batched ``torch.linalg.solve`` and sampled in one ``grid_sample``."""
    n, device = batch.shape[0], batch.device
    # Sampling needs output -> input, so solve for the map endpoints -> startpoints.
    out_pts = endpoints.to(device=device, dtype=torch.float64)
    in_pts = startpoints.to(device=device, dtype=torch.float64)
    x, y = out_pts[..., 0], out_pts[..., 1]
    u, v = in_pts[..., 0], in_pts[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)
    coeffs = torch.linalg.solve(system, torch.cat([u, v], dim=1))
    h = coeffs.float().reshape(n, 8, 1, 1).unbind(dim=1)
    xs, ys = _pixel_axes(batch)
    depth = h[6] * xs + h[7] * ys + 1
    x_src = (h[0] * xs + h[1] * ys + h[2]) / depth
    y_src = (h[3] * xs + h[4] * ys + h[5]) / depth
    return _sample(batch, x_src, y_src, interpolation)


def random_crop(
    batch: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pad by ``padding`` (zeros) and crop back to size at a random offset per image."""
    if padding == 0:
        return batch
    n, channels, height, width = batch.shape
    device = batch.device
    padded = NF.pad(batch, (padding, padding, padding, padding))
    dy = _randint(2 * padding + 1, (n,), generator, device)
    dx = _randint(2 * padding + 1, (n,), generator, device)
    rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
    index = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(channels, device=device)[None, :, None, None]
    return padded[index, channel, rows, cols]


def random_resized_crop(
    batch: torch.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box per image (area fraction in ``scale``, aspect ratio in ``ratio``,
    log-uniform) and resize it bilinearly back to ``H x W``. Like torchvision, ten boxes
    are tried per image, all at once; an image with none that fits keeps its full frame."""
    n, _, height, width = batch.shape
    device, tries = batch.device, 10
    area = (
        height * width * (scale[0] + (scale[1] - scale[0]) * _rand((n, tries), generator, device))
    )
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand((n, tries), generator, device))
    crop_w = torch.sqrt(area * aspect).round()
    crop_h = torch.sqrt(area / aspect).round()
    fits = (crop_w >= 1) & (crop_w <= width) & (crop_h >= 1) & (crop_h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    crop_w = torch.where(found, crop_w.gather(1, first).squeeze(1), float(width))
    crop_h = torch.where(found, crop_h.gather(1, first).squeeze(1), float(height))
    left = (_rand((n,), generator, device) * (width - crop_w + 1)).floor()
    top = (_rand((n,), generator, device) * (height - crop_h + 1)).floor()
    # Bilinear resize of the crop (align_corners=False, no antialias: crops only enlarge),
    # with taps clamped to the crop so nothing outside it leaks in, as in crop-then-resize.
    x_src = _resize_taps(left, crop_w, width)[:, None, :]
    y_src = _resize_taps(top, crop_h, height)[:, :, None]
    return _sample(batch, x_src, y_src, "bilinear")


def _resize_taps(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """Source pixel positions (``N x size``) that stretch ``[start, start + length)`` over
    ``size`` output pixels, clamped to the crop."""
    out = torch.arange(size, device=start.device, dtype=torch.float32)
    source = start[:, None] - 0.5 + (out + 0.5) * (length / size)[:, None]
    return torch.minimum(torch.maximum(source, start[:, None]), (start + length - 1)[:, None])


# ------------------------------------------------------------------------ RandAugment

_RANDAUGMENT_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
_SIGNED = frozenset(_RANDAUGMENT_OPS[1:10])  # ShearX .. Sharpness take a random sign
# Contiguous ids of the ops that are one affine warp each: one grid_sample serves them all.
_GEOMETRIC = range(_RANDAUGMENT_OPS.index("ShearX"), _RANDAUGMENT_OPS.index("Rotate") + 1)

_PIXEL_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Brightness": lambda batch, m: brightness_mul(batch, 1 + m),
    "Color": lambda batch, m: color(batch, 1 + m),
    "Contrast": lambda batch, m: contrast(batch, 1 + m),
    "Sharpness": lambda batch, m: sharpness(batch, 1 + m),
    "Posterize": posterize,
    "Solarize": lambda batch, m: solarize(batch, 255 * m),
    "AutoContrast": lambda batch, m: autocontrast(batch),
    "Equalize": lambda batch, m: equalize(batch),
}


class BatchRandAugment:
    """RandAugment (Cubuk et al., 2020) with torchvision's op list and magnitude ranges,
    applied to a whole batch at once: every image draws its own ``num_ops`` ops and signs,
    and the images are grouped by op so each op runs once per round on its subset."""

    ops = _RANDAUGMENT_OPS

    def __init__(self, num_ops: int, magnitude: int, num_magnitude_bins: int = 31) -> None:
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be in [0, {num_magnitude_bins - 1}], got {magnitude}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins

    def magnitudes(self, height: int, width: int) -> torch.Tensor:
        """Unsigned magnitude of each op at ``self.magnitude``, from torchvision's tables."""
        bins, level = self.num_magnitude_bins, self.magnitude

        def linear(start: float, end: float) -> float:
            return float(torch.linspace(start, end, bins)[level])

        bits = float((8 - torch.arange(bins) / ((bins - 1) / 4)).round()[level])
        table = {
            "ShearX": linear(0.0, 0.3),
            "ShearY": linear(0.0, 0.3),
            "TranslateX": linear(0.0, 150.0 / 331.0 * width),
            "TranslateY": linear(0.0, 150.0 / 331.0 * height),
            "Rotate": linear(0.0, 30.0),
            "Brightness": linear(0.0, 0.9),
            "Color": linear(0.0, 0.9),
            "Contrast": linear(0.0, 0.9),
            "Sharpness": linear(0.0, 0.9),
            "Posterize": bits,
            "Solarize": linear(1.0, 0.0),
        }
        return torch.tensor([table.get(name, 0.0) for name in self.ops], dtype=torch.float64)

    def sample(
        self,
        n: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image draws: op ids (``n x num_ops``, index into ``ops``) and signed magnitudes
        (a random sign per image and round for the signed ops)."""
        op_ids = _randint(len(self.ops), (n, self.num_ops), generator, device)
        signed = torch.tensor([name in _SIGNED for name in self.ops], device=device)[op_ids]
        negate = signed & (_rand((n, self.num_ops), generator, device) < 0.5)
        values = self.magnitudes(height, width).to(device)[op_ids]
        return op_ids, torch.where(negate, -values, values)

    def apply(
        self, batch: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor
    ) -> torch.Tensor:
        """Apply given per-image draws (as from ``sample``) round by round."""
        for step in range(op_ids.shape[1]):
            batch = self._apply_round(batch, op_ids[:, step], magnitudes[:, step])
        return batch

    def __call__(
        self, batch: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augment a uint8 batch; returns a uint8 batch of the same shape and device."""
        n, _, height, width = batch.shape
        return self.apply(batch, *self.sample(n, height, width, batch.device, generator))

    def _apply_round(
        self, batch: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor
    ) -> torch.Tensor:
        # Sorting by op id lays every op's images out contiguously: one device sync (the
        # counts) per round instead of one per op, and the geometric ops (contiguous ids)
        # form a single slice that one warp serves.
        order = torch.argsort(op_ids, stable=True)
        every_op = torch.arange(len(self.ops), device=op_ids.device)
        # Counted by comparison, not bincount, which deterministic mode flags on CUDA.
        counts = (op_ids[:, None] == every_op).sum(dim=0).tolist()
        bounds = [0, *itertools.accumulate(counts)]
        out = batch.clone()
        chosen = order[bounds[_GEOMETRIC.start] : bounds[_GEOMETRIC.stop]]
        if chosen.numel():
            matrices = self._geometric_matrices(
                op_ids[chosen], magnitudes[chosen], *batch.shape[-2:]
            )
            out[chosen] = warp_affine(batch[chosen], matrices)
        for name, op in _PIXEL_OPS.items():
            op_id = self.ops.index(name)
            chosen = order[bounds[op_id] : bounds[op_id + 1]]
            if chosen.numel():
                out[chosen] = op(batch[chosen], magnitudes[chosen])
        return out

    @staticmethod
    def _geometric_matrices(
        op_ids: torch.Tensor, magnitudes: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """One matrix per image: build every geometric candidate (cheap, ``n x 2 x 3``) and
        pick by op id, so no further grouping (and no device sync) is needed."""
        m = magnitudes.float()
        shift, zero = m.trunc(), torch.zeros_like(m)  # torchvision translates by int(m)
        candidates = torch.stack(
            [
                _shear_x_matrix(m),
                _shear_y_matrix(m),
                _translation_matrix(shift, zero),
                _translation_matrix(zero, shift),
                _rotation_matrix(m, height, width),
            ]
        )
        return candidates[op_ids - _GEOMETRIC.start, torch.arange(len(m), device=m.device)]


# ---------------------------------------------------------------------- CutMix / MixUp


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al., 2018): each image is blended with a random partner (a
    permutation of the batch) with its own ``lam ~ Beta(alpha, alpha)``; the probability
    targets are blended with the same ``lam``."""
    n = images.shape[0]
    partner = _randperm(n, generator, images.device)
    lam = _beta(alpha, n, generator, images.device)
    lam_images = lam.to(images.dtype).reshape(-1, 1, 1, 1)
    lam_targets = lam.to(device=targets.device, dtype=targets.dtype)[:, None]
    partner_t = partner.to(targets.device)
    mixed = lam_images * images + (1 - lam_images) * images[partner]
    return mixed, lam_targets * targets + (1 - lam_targets) * targets[partner_t]


def cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al., 2019): paste a box from a random partner into each image. The
    box has area ``(1 - lam) * H * W`` for ``lam ~ Beta(alpha, alpha)`` and a random centre;
    it is clipped at the border, and the targets are weighted by the area actually pasted."""
    n, _, height, width = images.shape
    device = images.device
    partner = _randperm(n, generator, device)
    side = torch.sqrt(1 - _beta(alpha, n, generator, device))
    box_w = (width * side).long()
    box_h = (height * side).long()
    top = _randint(height, (n,), generator, device) - box_h // 2
    left = _randint(width, (n,), generator, device) - box_w // 2
    bottom = (top + box_h).clamp(0, height)
    right = (left + box_w).clamp(0, width)
    top, left = top.clamp(0, height), left.clamp(0, width)
    inside = _box_mask(
        torch.arange(height, device=device),
        torch.arange(width, device=device),
        top,
        bottom,
        left,
        right,
    )
    mixed = torch.where(inside, images[partner], images)
    pasted = ((bottom - top) * (right - left)).to(targets.dtype) / (height * width)
    pasted = pasted.to(targets.device)[:, None]
    mixed_targets = (1 - pasted) * targets + pasted * targets[partner.to(targets.device)]
    return mixed, mixed_targets


# --------------------------------------------------------------------------- policies


def _weak(images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Random crop with zero padding ``max(1, W // 8)``, then a coin-flip mirror per image."""
    images = random_crop(images, max(1, images.shape[-1] // 8))
    if flip:
        images = hflip(images, _rand((images.shape[0],), None, images.device) < 0.5)
    return images


def classic(images: torch.Tensor, flip: bool) -> torch.Tensor:
    """The lecture's classic augmentations with per-image random values: brightness by an
    added value and by a factor (clipped), a resized crop, a rotation, an affine warp from
    three jittered corner correspondences and a perspective warp of the four corners."""
    n, _, height, width = images.shape
    device = images.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * _rand((n, *shape), None, device)

    images = brightness_add(images, uniform(-32, 32))
    images = brightness_mul(images, uniform(0.8, 1.2))
    images = random_resized_crop(images, scale=(0.7, 1.0))
    images = rotate(images, uniform(-10, 10))
    corners = torch.tensor(
        [[0.0, 0.0], [width - 1.0, 0.0], [width - 1.0, height - 1.0], [0.0, height - 1.0]],
        device=device,
    ).expand(n, 4, 2)
    jitter = torch.tensor([width, height], device=device) * 0.08
    src = corners[:, :3]
    images = warp_affine(images, affine_from_points(src, src + uniform(-1, 1, 3, 2) * jitter))
    images = perspective(images, corners, corners + uniform(-1, 1, 4, 2) * jitter)
    if flip:
        images = hflip(images, _rand((n,), None, device) < 0.5)
    return images


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 to float in [0, 1], the same scaling the engine uses for evaluation."""
    return images.float().div_(255.0)


def build_augment(
    policy: str,
    *,
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 9,
    cutmix_alpha: float = 0.0,
    mixup_alpha: float = 0.0,
    mix_prob: float = 0.5,
    hflip: bool = False,
) -> Augment:
    """The augmentation of a training batch on its own device.

    ``none``: only the conversion to float. ``weak`` (the teacher): random crop with zero
    padding ``max(1, W // 8)``, plus a random horizontal flip per image if ``hflip``.
    ``classic``: the lecture's brightness, crop, rotation, affine and perspective warps.
    ``strong`` (students): per-image RandAugment(N, M), then the weak crop/flip, then with
    probability ``mix_prob`` per batch CutMix (``cutmix_alpha > 0``) or MixUp
    (``mixup_alpha > 0``), one of the two at random when both are enabled.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown augment policy {policy!r}; allowed: {', '.join(POLICIES)}")
    if cutmix_alpha < 0 or mixup_alpha < 0:
        raise ValueError("cutmix_alpha and mixup_alpha must be >= 0")
    if not 0.0 <= mix_prob <= 1.0:
        raise ValueError(f"mix_prob must be in [0, 1], got {mix_prob}")
    if policy == "none":
        return lambda images, targets: (_to_float(images), targets)
    if policy == "weak":
        return lambda images, targets: (_to_float(_weak(images, hflip)), targets)
    if policy == "classic":
        return lambda images, targets: (_to_float(classic(images, hflip)), targets)

    rand_augment = BatchRandAugment(randaugment_ops, randaugment_magnitude)
    mixers: list[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = []
    if cutmix_alpha > 0:
        mixers.append(lambda x, y: cutmix(x, y, cutmix_alpha))
    if mixup_alpha > 0:
        mixers.append(lambda x, y: mixup(x, y, mixup_alpha))

    def strong(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _to_float(_weak(rand_augment(images), hflip))
        if mixers and float(torch.rand(())) < mix_prob:
            mix = mixers[int(torch.randint(len(mixers), ()))]
            return mix(x, targets)
        return x, targets

    return strong
