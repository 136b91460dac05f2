"""The caption loader's image path (data/transforms.py views, data/sample.py decoding) against
independent references: torchvision's RandomResizedCrop and resized_crop, timm's RandAugment,
ToTensor + Normalize, and PIL's own JPEG decoder."""

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from dlip_ds.config import VisionConfig
from dlip_ds.data.sample import load_image, open_image
from dlip_ds.data.transforms import (
    _RANDAUG_ARGS,
    _RANDAUG_OPS,
    _SIGNED,
    RANDAUGMENT,
    EvalView,
    TrainView,
    View,
    apply_randaugment,
    draw_randaugment,
    eval_transform,
    normalize_batch,
    sample_crop,
)

VISION = VisionConfig(image_size=16)


def photo(w, h, seed=0):
    """Smooth random content (upsampled noise), so that resampling differences show but stay small."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC)


def jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kw.pop("quality", 92), **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- draws


@pytest.mark.parametrize("size", [(300, 200), (160, 400)])
def test_crop_sampler_has_torchvision_distribution(size):
    """Same law as RandomResizedCrop.get_params (drawn from torch there, from a random.Random here):
    quantiles of height, width, top and left agree within sampling noise."""
    w, h = size
    n = 6000
    rng = random.Random(0)
    ours = np.array([sample_crop(rng, w, h, (0.5, 1.0)) for _ in range(n)], dtype=float)
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    ref = np.array([T.RandomResizedCrop.get_params(img, (0.5, 1.0), (3 / 4, 4 / 3)) for _ in range(n)], dtype=float)
    for k, name in enumerate(("top", "left", "height", "width")):
        q = np.linspace(0.05, 0.95, 10)
        span = max(1.0, ref[:, k].max() - ref[:, k].min())
        np.testing.assert_allclose(np.quantile(ours[:, k], q), np.quantile(ref[:, k], q), atol=0.03 * span,
                                   err_msg=name)
    # the box reaches every edge, never past one (an off-by-one in the offsets' ranges shows here)
    assert ours[:, :2].min() == 0 and (ours[:, 0] + ours[:, 2]).max() == h and (ours[:, 1] + ours[:, 3]).max() == w


def test_crop_sampler_fallback_is_torchvision_central_crop():
    img = torch.zeros(1, 40, 1000)  # no crop of area >= half fits the aspect range: the central crop
    assert sample_crop(random.Random(1), 1000, 40, (0.5, 1.0)) == T.RandomResizedCrop.get_params(
        img, (0.5, 1.0), (3 / 4, 4 / 3))


def test_randaugment_arguments_are_timms():
    from timm.data.auto_augment import LEVEL_TO_ARG

    for name in _RANDAUG_OPS:
        level = LEVEL_TO_ARG[name]
        want = None if level is None else abs(level(5, {"translate_pct": 0.45})[0])
        assert _RANDAUG_ARGS[name] == want, name


def test_randaugment_draws_match_timm_frequencies():
    """Which ops, with which arguments, in which order: timm's RandAugment (what `train_transform` runs,
    its op functions swapped for recorders) against `draw_randaugment`, outcome by outcome."""
    from timm.data.auto_augment import rand_augment_transform

    timm_ra = rand_augment_transform(RANDAUGMENT, {"img_mean": (0, 0, 0)}, transforms=_RANDAUG_OPS)
    seen = []
    for op in timm_ra.ops:
        op.aug_fn = lambda img, *args, _name=op.name, **kw: seen.append((_name, args[0] if args else None)) or img
    n = 20000
    random.seed(0)
    np.random.seed(0)
    theirs = Counter()
    for _ in range(n):
        seen.clear()
        timm_ra(None)
        theirs[tuple(seen)] += 1
    rng = random.Random(0)
    ours = Counter(draw_randaugment(rng) for _ in range(n))
    assert len(theirs) > 150 and set(ours) <= set(theirs)  # the same (op, argument) values, nothing else
    for outcome in theirs.keys() | ours.keys():  # no op, one op (0.028-0.056 each), two ops (<= 0.0031)
        assert abs(ours[outcome] - theirs[outcome]) / n < 0.008, (outcome, ours[outcome], theirs[outcome])
    for k in range(3):  # how many ops are applied: 1/4, 1/2, 1/4
        assert abs(sum(c for o, c in ours.items() if len(o) == k) - sum(c for o, c in theirs.items() if len(o) == k)) / n < 0.02
    for op in {op for o in theirs for op in o}:  # each (op, argument), wherever drawn: 0.056 (signed) or 0.11
        assert abs(sum(c * o.count(op) for o, c in ours.items()) - sum(c * o.count(op) for o, c in theirs.items())) / n < 0.008


def _timm_op(img, name, arg, fill):
    from timm.data.auto_augment import NAME_TO_OP

    return NAME_TO_OP[name](img, *(() if arg is None else (arg,)), fillcolor=fill, resample=Image.Resampling.BILINEAR)


@pytest.mark.parametrize(("name", "arg"), [(name, sign * arg if name in _SIGNED else arg)
                                           for name, arg in _RANDAUG_ARGS.items() for sign in (1, -1)
                                           if sign == 1 or name in _SIGNED])
def test_randaugment_op_is_timms(name, arg):
    """Each op at its drawn argument against timm's PIL op (bilinear, as BLIP). The warps are OpenCV's:
    where neither result depends on the fill, ours is PIL's or 1 level above (PIL truncates, OpenCV
    rounds); along the edge of the fill OpenCV blends the last pixel with it, PIL cuts it sharp, so at
    most about one pixel per pixel of that edge differs by more. A wrong op, sign, magnitude, centre
    (half a pixel) or fill breaks one or the other."""
    import cv2

    img = photo(52, 44, seed=3)  # 0.225 x 52 and x 44 are not whole pixels
    fill = (123, 117, 104)
    ours = apply_randaugment(img, ((name, arg),), fill).astype(int)
    theirs = np.asarray(_timm_op(img, name, arg, fill)).astype(int)
    if name not in _SIGNED:
        assert (ours == theirs).all()  # timm's own function (or its identity)
        return
    assert cv2.getNumThreads() == 1  # a loader worker starts no OpenCV threads
    filled = np.zeros(ours.shape[:2], bool)  # pixels that depend on the fill, in either
    for other in ((0, 0, 0), (255, 255, 255)):
        filled |= (apply_randaugment(img, ((name, arg),), other) != ours).any(-1)
        filled |= (np.asarray(_timm_op(img, name, arg, other)) != theirs).any(-1)
    assert 0.05 < filled.mean() < 0.5
    diff = ours - theirs
    assert diff[~filled].min() >= 0 and diff[~filled].max() <= 1, (diff[~filled].min(), diff[~filled].max())
    assert (np.abs(diff).max(-1) > 1).sum() <= 52 + 44  # the fill's edges: at most 52 + 44 pixels long here


def test_randaugment_applies_ops_in_drawn_order():
    """Warps and PIL ops chained, against timm's ops one after another. On a dark image, AutoContrast
    and Equalize after a warp see the brighter fill: the order shows."""
    img = Image.fromarray((np.asarray(photo(52, 44, seed=5)) // 3 + 10).astype(np.uint8))
    fill = (123, 117, 104)
    for ops in ((("Rotate", -15.0), ("AutoContrast", None)), (("Equalize", None), ("ShearX", 0.15)),
                (("TranslateYRel", 0.225), ("ShearY", -0.15))):
        theirs = img
        for name, arg in ops:
            theirs = _timm_op(theirs, name, arg, fill)
        theirs = np.asarray(theirs).astype(int)
        ours = apply_randaugment(img, ops, fill).astype(int)
        swapped = apply_randaugment(img, ops[::-1], fill).astype(int)
        # 4 levels: AutoContrast stretches the warp's 1-level differences; the rest is the fill's edge
        close = (np.abs(ours - theirs).max(-1) <= 4).mean()
        assert close > 0.9, (ops, close)
        assert (np.abs(swapped - theirs).max(-1) <= 4).mean() < close - 0.1, ops


# --------------------------------------------------------------------------- rendering


def test_render_is_torchvision_resized_crop_for_a_fixed_box():
    img = photo(60, 40)
    view = TrainView(VISION, randaugment=False)
    box = (5, 7, 30, 25)
    want = np.asarray(TF.resized_crop(img, *box, [16, 16], T.InterpolationMode.BICUBIC))
    got = view.render(img, View(box, flip=False), 60, 40)
    assert got.dtype == torch.uint8 and got.shape == (3, 16, 16)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)
    flipped = view.render(img, View(box, flip=True), 60, 40)
    assert np.array_equal(flipped.permute(1, 2, 0).numpy(), want[:, ::-1])


def test_eval_view_is_eval_transform():
    img = photo(30, 20)
    pixels = EvalView(VISION).render(img, View(), 30, 20)
    got = normalize_batch([pixels], VISION.mean, VISION.std)[0]
    torch.testing.assert_close(got, eval_transform(VISION)(img), atol=1e-5, rtol=0)


def test_normalize_batch_is_to_tensor_normalize():
    imgs = [photo(16, 16, seed=s) for s in range(3)]
    got = normalize_batch([torch.from_numpy(np.asarray(i).transpose(2, 0, 1).copy()) for i in imgs], VISION.mean,
                          VISION.std)
    ref = torch.stack([T.Normalize(VISION.mean, VISION.std)(T.ToTensor()(i)) for i in imgs])
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_train_view_draws_everything_from_its_rng():
    view = TrainView(VISION, randaugment=True)
    a = [view.draw(random.Random(7), 50, 40) for _ in range(2)]
    assert a[0] == a[1]
    draws = [view.draw(random.Random(s), 50, 40) for s in range(400)]
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
    assert any(d.ops for d in draws) and any(not d.ops for d in draws)


# --------------------------------------------------------------------------- decoding


def test_jpeg_decode_is_pils():
    for img in (photo(40, 30), photo(40, 30).convert("L")):
        data = jpeg(img)
        opened = open_image(data)
        assert opened.jpeg and (opened.width, opened.height) == (40, 30)
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(np.asarray(load_image(opened)), want)


def test_exif_rotated_and_cmyk_jpegs_go_through_pil():
    img = photo(24, 12)
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: upright it is 12 x 24
    opened = open_image(jpeg(img, exif=exif.tobytes()))
    assert not opened.jpeg and (opened.width, opened.height) == (12, 24)
    assert load_image(opened).size == (12, 24)
    cmyk = open_image(jpeg(img.convert("CMYK")))
    assert not cmyk.jpeg and load_image(cmyk).mode == "RGB"


def test_reduced_scale_decode_is_close_to_full_decode():
    """A crop much larger than the output is decoded at a reduced DCT scale; the pixels stay close to
    the full-size decode (both bicubic-resized to S): about as close as a q95 JPEG is to its source
    (PSNR around 40 dB; DCT-domain scaling is a slightly different low-pass filter than the bicubic
    antialias, so they cannot agree exactly)."""
    img = photo(512, 384, seed=5)
    data = jpeg(img, quality=95)
    opened = open_image(data)
    view = TrainView(VisionConfig(image_size=64), randaugment=False)
    v = View((10, 20, 360, 480), flip=False)
    min_size = view.min_decode_size(v, 512, 384)
    small = load_image(opened, min_size)
    assert small.width < 512 and small.width >= min_size[0] and small.height >= min_size[1]  # the reduced path ran
    got = view.render(small, v, 512, 384).float()
    full = view.render(load_image(open_image(data)), v, 512, 384).float()
    psnr = 10 * torch.log10(255**2 / ((got - full) ** 2).mean())
    assert psnr > 38 and (got - full).abs().mean() < 2.5, psnr
