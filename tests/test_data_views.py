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


def test_randaugment_matches_timm_outcome_frequencies():
    """timm's RandAugment (what `train_transform` runs) and ours (draw + apply) on one image: each
    distinct output image must come up about as often. Exact pixels and probabilities both count."""
    img = photo(24, 20, seed=3)
    fill = (123, 117, 104)
    n = 4000
    from timm.data.auto_augment import rand_augment_transform

    # bilinear resampling, as BLIP's RandomAugment (timm's default would draw bicubic half the time)
    timm_ra = rand_augment_transform(RANDAUGMENT, {"img_mean": fill, "interpolation": Image.Resampling.BILINEAR},
                                     transforms=_RANDAUG_OPS)
    random.seed(0)
    np.random.seed(0)
    theirs = Counter(timm_ra(img).tobytes() for _ in range(n))
    rng = random.Random(0)
    ours = Counter(apply_randaugment(img, draw_randaugment(rng), fill).tobytes() for _ in range(n))
    assert len(theirs) > 20  # the test sees many distinct outcomes
    for outcome, count in theirs.most_common(25):
        assert abs(ours[outcome] - count) / n < 0.025, (count, ours[outcome])
    # Two-op outcomes are many and rare, so each set misses some of the other's; the same share both ways
    # (a wrong op or argument would leave a share of ours unmatched that timm's sample does not show).
    missed = [sum(b[o] for o in b if o not in a) / n for a, b in ((theirs, ours), (ours, theirs))]
    assert max(missed) < 0.08 and abs(missed[0] - missed[1]) < 0.03, missed


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
