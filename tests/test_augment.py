from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from noisy_student.augment import (
    BatchRandAugment,
    affine_from_points,
    autocontrast,
    brightness_add,
    brightness_mul,
    build_augment,
    color,
    contrast,
    cutmix,
    cutout,
    equalize,
    hflip,
    mixup,
    perspective,
    posterize,
    random_crop,
    random_resized_crop,
    rotate,
    sharpness,
    solarize,
    translate_x,
    translate_y,
    vflip,
    warp_affine,
)

OPS = BatchRandAugment.ops


def _image(channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, channels, size, size), dtype=torch.uint8, generator=generator)


def _distinct(batch: torch.Tensor) -> int:
    return len({tuple(image.flatten().tolist()) for image in batch})


# ------------------------------------------------------------------------- pixel ops


def test_brightness_add_clips_at_both_ends() -> None:
    batch = torch.tensor([0, 100, 250], dtype=torch.uint8).reshape(1, 1, 1, 3).repeat(2, 1, 1, 1)
    out = brightness_add(batch, torch.tensor([10.0, -120.0]))
    assert out.dtype == torch.uint8
    assert out.flatten(1).tolist() == [[10, 110, 255], [0, 0, 130]]


def test_brightness_mul_clips_and_truncates() -> None:
    batch = torch.tensor([0, 100, 201], dtype=torch.uint8).reshape(1, 1, 1, 3).repeat(2, 1, 1, 1)
    out = brightness_mul(batch, torch.tensor([1.5, 0.5]))
    assert out.flatten(1).tolist() == [[0, 150, 255], [0, 50, 100]]


def test_posterize_solarize_contrast_and_color_values() -> None:
    batch = torch.tensor([183, 50, 200], dtype=torch.uint8).reshape(1, 1, 1, 3).repeat(3, 1, 1, 1)
    assert posterize(batch, torch.tensor([8, 4, 1])).flatten(1).tolist() == [
        [183, 50, 200],
        [176, 48, 192],
        [128, 0, 128],
    ]
    assert solarize(batch, torch.tensor([0.0, 100.0, 255.0])).flatten(1).tolist() == [
        [72, 205, 55],
        [72, 50, 55],
        [183, 50, 200],
    ]
    # Factor 0 gives the mean grey level (433 / 3, truncated), 1 the image itself.
    assert contrast(batch, torch.tensor([0.0, 1.0, 0.0])).flatten(1).tolist() == [
        [144, 144, 144],
        [183, 50, 200],
        [144, 144, 144],
    ]
    assert color(batch, 0.0) is batch  # greyscale has no saturation to change
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).reshape(1, 3, 1, 1)
    assert color(rgb, 0.0).flatten().tolist() == [76, 76, 76]  # 0.2989 * 255, floored


def test_sharpness_blends_the_interior_with_the_smoothed_image() -> None:
    batch = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    batch[:, :, 1, 1] = 130
    out = sharpness(batch, torch.tensor([0.0, 2.0]))
    # Smoothed centre: 5 * 130 / 13 = 50; factor 2 extrapolates to 2 * 130 - 50 = 210.
    assert out[:, 0, 1, 1].tolist() == [50, 210]
    assert (out[:, :, 0] == 0).all() and (out[:, :, :, 0] == 0).all()  # border untouched


def test_flips_follow_the_per_image_mask() -> None:
    batch = torch.arange(12, dtype=torch.uint8).reshape(2, 1, 2, 3)
    mask = torch.tensor([True, False])
    out = hflip(batch, mask)
    assert out[0, 0].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert torch.equal(out[1], batch[1])
    out = vflip(batch, mask)
    assert out[0, 0].tolist() == [[3, 4, 5], [0, 1, 2]]
    assert torch.equal(out[1], batch[1])


def test_equalize_and_autocontrast_work_per_image() -> None:
    batch = torch.tensor([[10, 20, 20, 40], [100, 110, 120, 120]], dtype=torch.uint8)
    # Stretched to [0, 255] per image (torchvision truncates 254.99... to 254).
    assert autocontrast(batch.reshape(2, 1, 1, 4)).flatten(1).tolist() == [
        [0, 84, 84, 254],
        [0, 127, 254, 254],
    ]
    generator = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 64, (1, 3, 32, 32), dtype=torch.uint8, generator=generator)
    bright = torch.randint(128, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=generator)
    out = equalize(torch.cat([dark, bright]))
    assert torch.equal(out[:1], TF.equalize(dark)) and torch.equal(out[1:], TF.equalize(bright))
    assert out.amax(dim=(1, 2, 3)).tolist() == [255, 255] and out[0].float().mean() > 100


def test_cutout_zeroes_one_clipped_square_per_image() -> None:
    torch.manual_seed(0)
    batch = torch.full((32, 1, 10, 10), 7, dtype=torch.uint8)
    out = cutout(batch, 4)
    holes = out[:, 0] == 0
    assert ((out == 0) | (out == 7)).all()
    rows, cols = holes.any(dim=2), holes.any(dim=1)
    # Each hole is the full box spanned by its rows and columns, at most 4 x 4.
    assert torch.equal(holes, rows[:, :, None] & cols[:, None, :])
    assert (rows.sum(1) <= 4).all() and (cols.sum(1) <= 4).all()
    assert (holes.sum(dim=(1, 2)) == 16).any() and (holes.sum(dim=(1, 2)) < 16).any()
    assert _distinct(out) > 10


# --------------------------------------------------------------------- geometric ops


def test_affine_from_points_maps_the_three_sources_onto_the_destinations() -> None:
    src = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    dst = torch.tensor([[2.0, 3.0], [4.0, 3.0], [2.0, 6.0]])
    assert affine_from_points(src, dst).tolist() == [[2.0, 0.0, 2.0], [0.0, 3.0, 3.0]]

    identity = affine_from_points(src, src)
    assert torch.equal(identity, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    generator = torch.Generator().manual_seed(0)
    src = torch.rand(16, 3, 2, generator=generator, dtype=torch.float64) * 28
    dst = torch.rand(16, 3, 2, generator=generator, dtype=torch.float64) * 28
    matrices = affine_from_points(src, dst)
    assert matrices.shape == (16, 2, 3)
    mapped = torch.cat([src, torch.ones(16, 3, 1, dtype=torch.float64)], -1) @ matrices.mT
    torch.testing.assert_close(mapped, dst, rtol=0, atol=1e-9)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_warp_affine_with_a_translation_shifts_the_image(interpolation: str) -> None:
    batch = torch.arange(1, 26, dtype=torch.uint8).reshape(1, 1, 5, 5).repeat(2, 1, 1, 1)
    matrices = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], [[1.0, 0.0, 0.0], [0, 1, 0]]])
    out = warp_affine(batch, matrices, interpolation)
    expected = torch.zeros(5, 5, dtype=torch.uint8)
    expected[1:, 2:] = batch[0, 0, :-1, :-2]  # right by 2, down by 1, zeros uncovered
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out[1], batch[1])  # identity


def test_translate_and_rotate_conventions() -> None:
    batch = torch.arange(1, 17, dtype=torch.uint8).reshape(1, 1, 4, 4).repeat(2, 1, 1, 1)
    out = translate_x(batch, torch.tensor([1.0, -2.0]))
    assert out[0, 0, 0].tolist() == [0, 1, 2, 3] and out[1, 0, 0].tolist() == [3, 4, 0, 0]
    assert translate_y(batch, 1.0)[0, 0, :, 0].tolist() == [0, 1, 5, 9]
    # Positive angles turn counter-clockwise, as torch.rot90 does.
    assert torch.equal(rotate(batch, 90.0), torch.rot90(batch, 1, dims=(-2, -1)))
    assert torch.equal(rotate(batch, torch.tensor([180.0, 0.0]))[1], batch[1])


def test_perspective_warps_each_image_by_its_own_points() -> None:
    batch = _image(3).repeat(2, 1, 1, 1)
    corners = torch.tensor([[0.0, 0.0], [7.0, 0.0], [7.0, 7.0], [0.0, 7.0]]).expand(2, 4, 2)
    moved = corners + torch.tensor([[[2.0, 1.0]], [[0.0, 0.0]]])
    out = perspective(batch, corners, moved)
    shift = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]])
    assert torch.equal(out[:1], warp_affine(batch[:1], shift, "bilinear"))
    assert torch.equal(out[1], batch[1])
    # A real projective warp: the far corner pulled in shrinks one side only.
    squeezed = corners.clone()
    squeezed[:, 2] = torch.tensor([5.0, 5.0])
    assert not torch.equal(perspective(batch, corners, squeezed), batch)


def test_random_crop_draws_an_offset_per_image() -> None:
    torch.manual_seed(0)
    batch = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(32, 1, 1, 1)
    out = random_crop(batch, 2)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert _distinct(out) > 5  # one draw per image, not one per batch
    padded = torch.nn.functional.pad(batch[0], (2, 2, 2, 2))
    windows = {
        tuple(padded[:, y : y + 8, x : x + 8].flatten().tolist())
        for y in range(5)
        for x in range(5)
    }
    assert {tuple(image.flatten().tolist()) for image in out} <= windows


def test_random_resized_crop_is_crop_then_bilinear_resize() -> None:
    torch.manual_seed(0)
    batch = _image(3).repeat(16, 1, 1, 1)
    assert torch.equal(random_resized_crop(batch, scale=(1.0, 1.0), ratio=(1.0, 1.0)), batch)
    out = random_resized_crop(batch, scale=(0.25, 0.25), ratio=(1.0, 1.0))  # 4 x 4 crops
    candidates = [
        TF.resize(batch[0, :, y : y + 4, x : x + 4].float(), [8, 8], antialias=False).round()
        for y in range(5)
        for x in range(5)
    ]
    for image in out:
        assert any(torch.equal(image.float(), candidate) for candidate in candidates)
    assert _distinct(out) > 5


# ------------------------------------------------------------------------ RandAugment


def _torchvision_op(image: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """What torchvision's RandAugment does for op ``name`` at signed magnitude ``m``."""
    shear = {
        "ShearX": [math.degrees(math.atan(m)), 0.0],
        "ShearY": [0.0, math.degrees(math.atan(m))],
    }
    if name in shear:
        return TF.affine(image, 0.0, [0, 0], 1.0, shear[name], center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return TF.affine(image, 0.0, shift, 1.0, [0.0, 0.0])
    calls = {
        "Identity": lambda: image,
        "Rotate": lambda: TF.rotate(image, m),
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + m),
        "Posterize": lambda: TF.posterize(image, int(m)),
        "Solarize": lambda: TF.solarize(image, 255.0 * m),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
    }
    return calls[name]()


@pytest.mark.parametrize(("channels", "size", "magnitude"), [(1, 28, 9), (3, 32, 30)])
def test_each_randaugment_op_computes_what_torchvision_computes(
    channels: int, size: int, magnitude: int
) -> None:
    augment = BatchRandAugment(1, magnitude)
    image = _image(channels, size)
    table = augment.magnitudes(size, size)
    for op, name in enumerate(OPS):
        for sign in (1.0, -1.0) if 1 <= op <= 9 else (1.0,):
            m = sign * float(table[op])
            ours = augment.apply(image, torch.tensor([[op]]), torch.tensor([[m]]))
            assert torch.equal(ours, _torchvision_op(image, name, m)), (name, m)


def test_randaugment_magnitudes_follow_torchvision_ranges() -> None:
    table = dict(zip(OPS, BatchRandAugment(2, 9).magnitudes(28, 28).tolist(), strict=True))
    assert table["Rotate"] == pytest.approx(9.0)
    assert table["ShearX"] == pytest.approx(0.09)
    assert table["TranslateX"] == pytest.approx(150 / 331 * 28 * 9 / 30)
    assert table["Brightness"] == pytest.approx(0.27)
    assert table["Posterize"] == 7.0 and table["Solarize"] == pytest.approx(0.7)
    assert table["Identity"] == table["Equalize"] == 0.0


def test_randaugment_draws_per_image() -> None:
    torch.manual_seed(0)
    batch = _image(3, 16).repeat(64, 1, 1, 1)
    augment = BatchRandAugment(2, 9)
    op_ids, magnitudes = augment.sample(64, 16, 16, batch.device)
    assert op_ids.shape == magnitudes.shape == (64, 2)
    assert len(set(op_ids.flatten().tolist())) == len(OPS)
    signed = [OPS.index(name) for name in ("Rotate", "ShearX", "Brightness")]
    drawn = magnitudes[torch.isin(op_ids, torch.tensor(signed))]
    assert (drawn > 0).any() and (drawn < 0).any()  # a random sign per image
    out = augment(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert _distinct(out) > 40


def test_images_with_the_same_draws_get_the_same_result_as_the_ops_alone() -> None:
    batch = _image(3, 16).repeat(4, 1, 1, 1)
    augment = BatchRandAugment(2, 9)
    rotate_id, solarize_id, equalize_id = (OPS.index(n) for n in ("Rotate", "Solarize", "Equalize"))
    op_ids = torch.tensor([[rotate_id, solarize_id]] * 2 + [[equalize_id, rotate_id]] * 2)
    magnitudes = torch.tensor([[-9.0, 0.7], [-9.0, 0.7], [0.0, 9.0], [0.0, 20.0]])
    out = augment.apply(batch, op_ids, magnitudes)
    expected = solarize(rotate(batch[:1], -9.0), 255 * 0.7)
    assert torch.equal(out[0:1], expected) and torch.equal(out[1:2], expected)
    assert torch.equal(out[2:3], rotate(equalize(batch[:1]), 9.0))
    assert not torch.equal(out[2], out[3])


def test_randaugment_is_reproducible_from_the_seed_or_a_generator() -> None:
    batch = _image(1, 16).repeat(16, 1, 1, 1)
    augment = BatchRandAugment(2, 9)
    torch.manual_seed(3)
    first = augment(batch)
    torch.manual_seed(3)
    assert torch.equal(augment(batch), first)
    assert not torch.equal(augment(batch), first)
    a = augment(batch, torch.Generator().manual_seed(1))
    assert torch.equal(augment(batch, torch.Generator().manual_seed(1)), a)


def test_randaugment_rejects_a_magnitude_outside_the_bins() -> None:
    with pytest.raises(ValueError, match="magnitude"):
        BatchRandAugment(2, 31)


# ---------------------------------------------------------------------- CutMix / MixUp


def _zeros_and_ones(n: int = 64, size: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the images all 0 (class 0), half all 1 (class 1): a pixel mean is then the
    fraction of the image that came from a class-1 image."""
    labels = torch.arange(n) % 2
    images = labels.float().reshape(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return images, labels


def test_cutmix_weights_labels_by_the_pasted_area_after_clipping() -> None:
    images, labels = _zeros_and_ones()
    one_hot = torch.nn.functional.one_hot(labels, 2).float()
    mixed, targets = cutmix(images, one_hot, 1.0, torch.Generator().manual_seed(0))
    ones = mixed.mean(dim=(1, 2, 3))
    torch.testing.assert_close(targets[:, 1], ones)
    torch.testing.assert_close(targets.sum(1), torch.ones(64))
    # The pasted region is one box per image; some boxes were clipped at the border.
    pasted = mixed[:, 0] != images[:, 0]
    rows, cols = pasted.any(dim=2), pasted.any(dim=1)
    assert torch.equal(pasted, rows[:, :, None] & cols[:, None, :])
    touches = rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1]
    assert (touches & (pasted.sum(dim=(1, 2)) < 100) & (pasted.sum(dim=(1, 2)) > 0)).any()
    assert ((ones > 0) & (ones < 1)).sum() > 10

    soft = torch.where(labels[:, None] == 1, torch.tensor([0.3, 0.7]), torch.tensor([0.8, 0.2]))
    _, soft_targets = cutmix(images, soft, 1.0, torch.Generator().manual_seed(0))
    expected = (1 - ones[:, None]) * torch.tensor([0.8, 0.2]) + ones[:, None] * torch.tensor(
        [0.3, 0.7]
    )
    torch.testing.assert_close(soft_targets, expected)
    torch.testing.assert_close(soft_targets.sum(1), torch.ones(64))


def test_mixup_mixes_images_and_targets_with_the_same_lambda() -> None:
    n = 16
    values = torch.arange(n, dtype=torch.float32) / n
    images = values.reshape(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    targets = torch.eye(n)
    torch.manual_seed(0)
    mixed, mixed_targets = mixup(images, targets, 0.4)
    torch.testing.assert_close(mixed_targets.sum(1), torch.ones(n))
    lams = []
    for i in range(n):
        lam = float(mixed_targets[i, i])
        others = mixed_targets[i].clone()
        others[i] = 0
        partner = int(others.argmax()) if others.max() > 0 else i
        expected = lam * values[i] + (1 - lam) * values[partner]
        torch.testing.assert_close(mixed[i], torch.full((3, 4, 4), float(expected)))
        lams.append(lam)
    assert len(set(lams)) > n // 2  # one lambda per image


# --------------------------------------------------------------------------- policies


def test_none_and_weak_return_floats_and_leave_targets_alone() -> None:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    targets = torch.eye(8)
    images, out_targets = build_augment("none")(batch, targets)
    assert images.dtype == torch.float32 and out_targets is targets
    torch.testing.assert_close(images, batch.float() / 255)
    images, _ = build_augment("weak", hflip=True)(batch, targets)
    assert images.shape == batch.shape and images.min() >= 0.0 and images.max() <= 1.0


def test_strong_policy_noises_each_image_and_mixes_targets() -> None:
    torch.manual_seed(0)
    batch = _image(3, 16).repeat(16, 1, 1, 1)
    targets = torch.nn.functional.one_hot(torch.arange(16) % 4, 4).float()
    augment = build_augment("strong", cutmix_alpha=1.0, mixup_alpha=0.2, mix_prob=1.0)
    images, mixed = augment(batch, targets)
    assert images.shape == batch.shape and images.dtype == torch.float32
    assert _distinct(images) > 12
    torch.testing.assert_close(mixed.sum(1), torch.ones(16))
    assert (mixed.max(1).values < 1).any()
    images, same = build_augment("strong", cutmix_alpha=1.0, mix_prob=0.0)(batch, targets)
    assert same is targets


def test_unknown_policy_and_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="allowed: none, weak, classic, strong"):
        build_augment("heavy")
    with pytest.raises(ValueError, match="mix_prob"):
        build_augment("strong", mix_prob=1.5)
    with pytest.raises(ValueError, match="alpha"):
        build_augment("strong", cutmix_alpha=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_everything_stays_on_the_gpu_and_matches_the_cpu() -> None:
    cuda = torch.device("cuda")
    batch = _image(3, 32).repeat(64, 1, 1, 1)
    augment = BatchRandAugment(2, 9)
    op_ids, magnitudes = augment.sample(64, 32, 32, torch.device("cpu"))
    on_cpu = augment.apply(batch, op_ids, magnitudes)
    on_gpu = augment.apply(batch.to(cuda), op_ids.to(cuda), magnitudes.to(cuda))
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().le(1).float().mean() > 0.99

    torch.manual_seed(0)
    out = augment(batch.to(cuda))
    torch.manual_seed(0)
    assert torch.equal(augment(batch.to(cuda)), out) and _distinct(out.cpu()) > 40
    cpu_generator = augment(batch.to(cuda), torch.Generator().manual_seed(0))
    assert cpu_generator.device.type == "cuda"

    targets = torch.eye(64, device=cuda)
    for policy in ("none", "weak", "strong"):
        step = build_augment(policy, cutmix_alpha=1.0, mixup_alpha=0.2, mix_prob=1.0, hflip=True)
        images, mixed = step(batch.to(cuda), targets)
        assert images.device.type == mixed.device.type == "cuda"
        assert images.dtype == torch.float32 and images.shape == batch.shape
    images = torch.rand(16, 3, 8, 8, device=cuda)
    for mix in (cutmix, mixup):
        mixed_images, mixed = mix(images, targets[:16, :16], 0.5)
        assert mixed_images.device.type == mixed.device.type == "cuda"
        torch.testing.assert_close(mixed.sum(1), torch.ones(16, device=cuda))


def test_classic_policy_draws_per_image_and_keeps_shape() -> None:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8).repeat(12, 1, 1, 1)
    targets = torch.eye(3)[torch.zeros(12, dtype=torch.long)]
    images, out_targets = build_augment("classic", hflip=True)(batch, targets)
    assert images.shape == batch.shape and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert len({tuple(img.flatten().tolist()) for img in images}) == 12
    assert torch.equal(out_targets, targets)
