"""Data for DTP-ViT.

Two on-disk formats cover everything we train on:
  * webdataset tar shards as written by img2dataset (CC12M, LAION, ...):
    {key}.jpg, {key}.txt (caption), {key}.json (metadata), optionally {key}.cls (label)
  * an ImageFolder tree root/{train,val}/<class>/<image> (ImageNet)

The built-in "shapes" dataset is procedurally generated and written in exactly
those formats, so demos and tests exercise the same code paths as real runs:

    python data.py            # writes data/shapes/ once (idempotent), prints a summary
"""
import argparse
import atexit
import fcntl
import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import multiprocessing.util  # registers its exit handler now, before end_workers (see there)
import os
import random
import re
import shutil
import signal
import tarfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from torchvision.datasets import ImageFolder

# -----------------------------------------------------------------------------
# The shapes dataset, in three styles (one setting, `shapes_style`, picks one; each has its own folder):
#   'colour'   one dominant shape on a grey background, label = colour x shape (30 classes). The shape is
#              the only strong hue, so a change of mean colour marks its edges: a cue that favours any
#              pooling that reads colour, and that real photographs do not hand out.
#   'clutter'  the same labels, on a mosaic of grey cells of every brightness: the pixels' colour changes
#              all over the image, as much between two cells as at a shape's edge.
#   'count'    1 to 6 small shapes, label = how many (6 classes); the caption says how many, and half the
#              time names them. Busy images hold more objects, so here the tokens an image gets can matter.

SHAPES_VERSION = 3  # bump whenever the generator changes, so old data is regenerated
STYLES_VERSION = 1  # the same for 'clutter' and 'count' alone (the default's data stays as it is)
SHAPES_STYLES = ('colour', 'clutter', 'count')
# No colour starts with a vowel, so "a {classname}" prompts are always grammatical.
COLOURS = {'red': (215, 40, 40), 'yellow': (240, 205, 30), 'green': (40, 160, 60),
           'blue': (35, 80, 215), 'purple': (135, 50, 175), 'pink': (245, 125, 185)}
SHAPES = ['circle', 'square', 'triangle', 'star', 'cross']
SHAPES_CLASSNAMES = [f'{c} {s}' for c in COLOURS for s in SHAPES]  # index == label
# The two halves of a class name, by label: evaluation also says how often each alone is right.
SHAPES_GROUPS = dict(colour=torch.arange(len(SHAPES_CLASSNAMES)) // len(SHAPES),
                     shape=torch.arange(len(SHAPES_CLASSNAMES)) % len(SHAPES))
# Zero-shot prompts, same form as open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES.
SHAPES_TEMPLATES = (
    lambda c: f'a photo of a {c}.',
    lambda c: f'a {c}.',
    lambda c: f'a small {c}.',
    lambda c: f'a large {c}.',
    lambda c: f'a {c} on a plain background.',
    lambda c: f'a {c} on a textured background.',
)
SIZES = {'small': 0.30, 'medium-sized': 0.42, 'large': 0.56}  # shape diameter / image side
BACKGROUNDS = ['plain', 'plain', 'striped', 'checkered', 'noisy']  # plain 40% of the time
CAPTIONS = ['a photo of a {size}{name}{pos}', 'a {size}{name}{pos}', 'an image of a {size}{name}{pos}',
            'a picture showing a {size}{name}{pos}', 'there is a {size}{name}{pos}']
COUNT_CAPTIONS = ['a photo of {name}', '{name}', 'an image of {name}', 'a picture showing {name}',
                  'a picture of {name}']
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges even at 32-64 px
SHAPES_ROOT = str(Path(__file__).resolve().parent / 'data' / 'shapes')  # git-ignored; other styles: shapes-<style>
COUNTS = ['one', 'two', 'three', 'four', 'five', 'six']
COUNT_CLASSNAMES = ['one shape'] + [f'{n} shapes' for n in COUNTS[1:]]  # index == label == count - 1
COUNT_TEMPLATES = (
    lambda c: f'a photo of {c}.',
    lambda c: f'{c}.',
    lambda c: f'an image of {c}.',
    lambda c: f'{c} on a plain background.',
    lambda c: f'{c} on a textured background.',
)


def shapes_task(style):
    """What a style's labels mean: dict(classnames (index == label), templates (zero-shot prompts),
    groups (for evaluation's accuracy of each half of a class name; None: none))."""
    check_style(style)
    if style == 'count':
        return dict(classnames=COUNT_CLASSNAMES, templates=COUNT_TEMPLATES, groups=None)
    return dict(classnames=SHAPES_CLASSNAMES, templates=SHAPES_TEMPLATES, groups=SHAPES_GROUPS)


def check_style(style):
    if style not in SHAPES_STYLES:
        raise ValueError(f'shapes_style={style!r}: expected one of {SHAPES_STYLES}')


def shapes_root(style='colour'):
    """Where a style's dataset is generated: data/shapes for the default style, data/shapes-<style> else."""
    check_style(style)
    return SHAPES_ROOT if style == 'colour' else f'{SHAPES_ROOT}-{style}'


def _class_dir(label, classnames=SHAPES_CLASSNAMES):
    # ImageFolder sorts class folders alphabetically; the zero-padded label prefix
    # makes that order equal to label order, so ImageFolder's targets == our labels.
    return f'{label:02d}_' + classnames[label].replace(' ', '_')


def _position_phrase(row, col):
    rows, cols = ['top', 'middle', 'bottom'], ['left', 'center', 'right']
    if row == 1 and col == 1:
        return 'in the center'
    if row == 1:
        return f'on the {cols[col]}'
    if col == 1:
        return f'at the {rows[row]}'
    return f'in the {rows[row]} {cols[col]} corner'


def _draw_shape(draw, shape, cx, cy, r, fill):
    def ring(radii):  # polygon with vertices at these radii, evenly spaced, first one straight up
        return [(cx + rr * math.cos(-math.pi / 2 + 2 * math.pi * k / len(radii)),
                 cy + rr * math.sin(-math.pi / 2 + 2 * math.pi * k / len(radii))) for k, rr in enumerate(radii)]

    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == 'square':
        s = 0.85 * r  # a touch smaller so its area is close to the circle's
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == 'triangle':
        draw.polygon(ring([1.1 * r] * 3), fill=fill)
    elif shape == 'star':
        draw.polygon(ring([r, 0.45 * r] * 5), fill=fill)
    elif shape == 'cross':
        w = 0.33 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def _background(rng, S, kind):
    # Low-saturation greys so the shape's colour is the only strong hue in the image.
    c1 = np.clip(rng.integers(50, 210) + rng.integers(-15, 16, 3), 0, 255)
    c2 = np.clip(c1 + rng.choice([-1, 1]) * rng.integers(25, 60), 0, 255)
    if kind == 'noisy':
        # Blotchy texture: low-res noise, mostly in brightness so it adds no strong hue, upsampled.
        k = int(rng.integers(4, S // SUPERSAMPLE // 2 + 1))
        noise = c1 + rng.normal(0, 30, (k, k, 1)) + rng.normal(0, 8, (k, k, 3))
        return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).resize((S, S), Image.BICUBIC)
    yy, xx = np.mgrid[0:S, 0:S]
    if kind == 'striped':
        angle = math.radians(rng.choice([0, 45, 90, 135]))
        period = rng.integers(3, 9) * SUPERSAMPLE
        mask = ((xx * math.cos(angle) + yy * math.sin(angle)) // period) % 2 == 1
    elif kind == 'checkered':
        cell = rng.integers(4, 13) * SUPERSAMPLE
        mask = (xx // cell + yy // cell) % 2 == 1
    else:  # plain
        mask = np.zeros((S, S), bool)
    return Image.fromarray(np.where(mask[..., None], c2, c1).astype(np.uint8))


class _Canvas:
    """An image being drawn at SUPERSAMPLE x its size, its object mask, and the image's RNG."""

    def __init__(self, rng, image_size):
        self.rng, self.S = rng, image_size * SUPERSAMPLE
        self.bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        self.img = _background(rng, self.S, self.bg)
        self.mask = Image.new('L', (self.S, self.S), 0)  # where the shapes are: the truth segments are measured on
        self.draw, self.draw_mask = ImageDraw.Draw(self.img), ImageDraw.Draw(self.mask)

    def shape(self, shape, cx, cy, r, fill):
        _draw_shape(self.draw, shape, cx, cy, r, fill)
        _draw_shape(self.draw_mask, shape, cx, cy, r, 255)

    def jittered(self, rgb):  # the same colour name covers a small range of RGB values
        return tuple(int(v) for v in np.clip(np.array(rgb) + self.rng.integers(-20, 21, 3), 0, 255))

    def place(self, cell, r, jitter=1 / 12):  # centre of a 3x3 grid cell, jittered, clamped to stay inside
        S, (row, col) = self.S, divmod(cell, 3)
        cx, cy = [(g + 0.5) / 3 * S + self.rng.uniform(-S * jitter, S * jitter) for g in (col, row)]
        return float(np.clip(cx, r + 2, S - r - 2)), float(np.clip(cy, r + 2, S - r - 2))

    def mosaic(self):
        """'clutter': cover the background with a mosaic of irregular grey cells (a Voronoi tiling) of every
        brightness, each about a patch wide. The colour (as the pixels' RGB) then changes between any two cells
        as much as at a shape's edge; the shapes stay the only saturated regions."""
        rng, S = self.rng, self.S
        centres = rng.uniform(0, S, (int(rng.integers(*CLUTTER_CELLS)), 2))
        yy, xx = np.mgrid[0:S:2, 0:S:2] + 0.5  # the tiling at half the drawing's resolution (8x faster), then doubled
        nearest = ((xx[..., None] - centres[:, 0]) ** 2 + (yy[..., None] - centres[:, 1]) ** 2).argmin(-1)
        greys = rng.integers(30, 226, len(centres))
        self.img = Image.fromarray(np.repeat(greys[nearest], 2, 0).repeat(2, 1).astype(np.uint8)).convert('RGB')
        self.draw = ImageDraw.Draw(self.img)

    def jpeg_and_mask(self):  # the mask: the share of each pixel on a shape
        img, mask = self.img.reduce(SUPERSAMPLE), self.mask.reduce(SUPERSAMPLE)
        buf = io.BytesIO()
        img.save(buf, format='JPEG', quality=90)
        return buf.getvalue(), np.asarray(mask)


CLUTTER_CELLS = (40, 61)  # 'clutter': how many mosaic cells (low, high + 1)


def _render(index, seed, split_id, image_size, style='colour'):
    """Draw image `index` of a split: (jpeg bytes, caption, label, object mask). Its RNG depends only on
    (seed, split, index), so the result is independent of generation order and parallelism."""
    rng = np.random.default_rng([seed, split_id, index])
    if style == 'count':
        return _render_count(rng, index, image_size)
    label = index % len(SHAPES_CLASSNAMES)  # balanced classes
    colour, shape = SHAPES_CLASSNAMES[label].split(' ')
    canvas = _Canvas(rng, image_size)
    S, bg, draw_shape, jittered, place = canvas.S, canvas.bg, canvas.shape, canvas.jittered, canvas.place
    if style == 'clutter':
        canvas.mosaic()
    cell = int(rng.integers(9))
    size = list(SIZES)[rng.integers(len(SIZES))]
    r = SIZES[size] * rng.uniform(0.92, 1.08) * S / 2
    # Distractors (35% of images): one or two much smaller shapes of another class in other
    # cells, drawn first so the labelled shape stays dominant and on top.
    n_distract = int(rng.integers(1, 3)) if rng.random() < 0.35 else 0
    for other_cell in rng.permutation([c for c in range(9) if c != cell])[:n_distract]:
        other = (label + int(rng.integers(1, len(SHAPES_CLASSNAMES)))) % len(SHAPES_CLASSNAMES)
        oc, os_ = SHAPES_CLASSNAMES[other].split(' ')
        rr = rng.uniform(0.12, 0.18) * S / 2
        draw_shape(os_, *place(int(other_cell), rr), rr, jittered(COLOURS[oc]))
    draw_shape(shape, *place(cell, r), r, jittered(COLOURS[colour]))

    # Size and position are each named in half of the captions only. Named always, colour + size +
    # position would single out almost every caption in a batch of 128 (6 x 3 x 9 = 162 combinations),
    # and contrastive training would have little reason to learn the shape.
    template = CAPTIONS[rng.integers(len(CAPTIONS))]
    size_words = f'{size} ' if rng.random() < 0.5 else ''
    position = ' ' + _position_phrase(*divmod(cell, 3)) if rng.random() < 0.5 else ''
    caption = template.format(size=size_words, name=SHAPES_CLASSNAMES[label], pos=position)
    if rng.random() < 0.5:  # 'clutter': the mosaic hides the background's pattern
        caption += f" on a {'patchwork' if style == 'clutter' else bg} background"
    if n_distract and rng.random() < 0.5:
        caption += ', next to smaller shapes'
    jpg, mask = canvas.jpeg_and_mask()
    return jpg, caption + '.', label, mask


def _render_count(rng, index, image_size):
    """'count': 1 to 6 small shapes of any class, each in its own cell of the 3x3 grid (never touching),
    label = their number - 1. The caption says how many, and half the time names each, in reading order."""
    label = index % len(COUNT_CLASSNAMES)  # balanced counts
    canvas = _Canvas(rng, image_size)
    names = []
    for cell in sorted(rng.choice(9, label + 1, replace=False)):
        # diameter <= 0.24 of the side and centres >= 1/3 - 2/30 apart: neighbours never touch
        r = rng.uniform(0.18, 0.24) * canvas.S / 2
        name = SHAPES_CLASSNAMES[rng.integers(len(SHAPES_CLASSNAMES))]
        colour, shape = name.split(' ')
        canvas.shape(shape, *canvas.place(int(cell), r, jitter=1 / 30), r, canvas.jittered(COLOURS[colour]))
        names.append(f'a {name}')
    listed = names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' and ' + names[-1]
    template = COUNT_CAPTIONS[rng.integers(len(COUNT_CAPTIONS))]
    # The shapes are listed in half of the captions only: with the list always there, the list alone tells a
    # batch's captions apart, and contrastive training had no reason to learn the count (32% zero-shot).
    caption = template.format(name=COUNT_CLASSNAMES[label] + (f': {listed}' if rng.random() < 0.5 else ''))
    if rng.random() < 0.5:
        caption += f' on a {canvas.bg} background'
    jpg, mask = canvas.jpeg_and_mask()
    return jpg, caption + '.', label, mask


def _tar_add(tar, name, blob):
    # Fixed metadata (mtime 0; TarInfo's defaults: owner 0, no user names) so that the
    # same content always gives the same tar bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(blob), 0, 0o644
    tar.addfile(info, io.BytesIO(blob))


def _write_shapes(out, pool, n_train, n_val, image_size, seed, shard_size, style):
    classnames = shapes_task(style)['classnames']
    for split in ('train', 'val'):
        for label in range(len(classnames)):
            (out / split / _class_dir(label, classnames)).mkdir(parents=True)
    (out / 'shards').mkdir()

    def rendered(split_id, n):  # (index, (jpg, caption, label, mask)), rendered in parallel, in index order
        render = partial(_render, seed=seed, split_id=split_id, image_size=image_size, style=style)
        return enumerate(pool.imap(render, range(n), chunksize=64))

    tar = None
    for i, (jpg, caption, label, _) in rendered(0, n_train):
        if i % shard_size == 0:
            if tar:
                tar.close()
            tar = tarfile.open(out / f'shards/train-{i // shard_size:06d}.tar', 'w')
        key = f'{i:09d}'  # img2dataset-style 9-digit key
        meta = dict(url=f'shapes://train/{key}', key=key, caption=caption, status='success',
                    error_message=None, width=image_size, height=image_size,
                    original_width=image_size, original_height=image_size,
                    label=label, classname=classnames[label])
        for ext, blob in [('cls', str(label).encode()), ('jpg', jpg),
                          ('json', json.dumps(meta).encode()), ('txt', caption.encode())]:
            _tar_add(tar, f'{key}.{ext}', blob)
        (out / 'train' / _class_dir(label, classnames) / f'{key}.jpg').write_bytes(jpg)
    if tar:
        tar.close()
    masks = np.zeros((n_val, image_size, image_size), np.uint8)
    for i, (jpg, caption, label, mask) in rendered(1, n_val):
        (out / 'val' / _class_dir(label, classnames) / f'{i:09d}.jpg').write_bytes(jpg)
        masks[i] = mask
    np.save(out / 'val_masks.npy', masks)


def make_shapes(root=None, n_train=10000, n_val=1500, image_size=64, seed=0,
                shard_size=1000, workers=None, style='colour'):
    """Generate the shapes dataset of a style (SHAPES_STYLES) under `root` (default: shapes_root(style))
    unless it is already there (meta.json matches the parameters). Layout:
        root/shards/train-000000.tar ...  webdataset shards (img2dataset layout + .cls)
        root/train/00_red_circle/000000000.jpg ...  ImageFolder, same images as the shards
        root/val/00_red_circle/000000000.jpg ...    held-out split (different seed stream)
        root/val_masks.npy                           (n_val, size, size) uint8: share of each val
                                                     pixel covered by a shape (0-255)
        root/meta.json                               parameters, written last
    Returns a summary dict (paths, counts, classnames, bytes, seconds, generated)."""
    root = Path(root or shapes_root(style))
    classnames = shapes_task(style)['classnames']
    params = dict(version=SHAPES_VERSION, seed=seed, n_train=n_train, n_val=n_val,
                  image_size=image_size, shard_size=shard_size, classnames=classnames)
    if style != 'colour':  # the default's meta.json stays as it was: its data is not generated again
        params.update(style=style, style_version=STYLES_VERSION)
    t0 = time.time()
    meta_file = root / 'meta.json'

    def up_to_date():  # meta.json is written last: where it matches, the whole dataset is there
        return meta_file.exists() and json.loads(meta_file.read_text()).get('params') == params

    generated = False
    if not up_to_date():  # a complete dataset is only read, so it may sit on a read-only mount
        root.parent.mkdir(parents=True, exist_ok=True)
        # Concurrent callers (DDP ranks, a test run next to a training run) queue on a lock
        # file; the later ones then find meta.json up to date and return at once.
        with open(root.with_name(root.name + '.lock'), 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            generated = not up_to_date()
            if generated:
                # Build in a temp dir and rename at the end: an interrupted run never leaves
                # a half-written dataset that looks complete.
                tmp = root.with_name(root.name + '.tmp')
                shutil.rmtree(tmp, ignore_errors=True)
                with mp.Pool(workers or os.cpu_count()) as pool:
                    _write_shapes(tmp, pool, n_train, n_val, image_size, seed, shard_size, style)
                n_shards = math.ceil(n_train / shard_size)
                (tmp / 'meta.json').write_text(json.dumps(dict(params=params, n_shards=n_shards), indent=1))
                shutil.rmtree(root, ignore_errors=True)
                tmp.rename(root)
    paths = shapes_paths(root)
    nbytes = sum(f.stat().st_size for f in root.rglob('*') if f.is_file())
    return dict(paths, n_train=n_train, n_val=n_val, n_classes=len(classnames), style=style,
                classnames=classnames, image_size=image_size, bytes=nbytes,
                seconds=time.time() - t0, generated=generated)


def shapes_paths(root=SHAPES_ROOT):
    """{'root', 'shards' (brace pattern for wds_loader), 'train', 'val', 'n_shards'} of a
    generated shapes dataset; 'train'/'val' are ImageFolder roots (imagenet_dataset(root, split))."""
    root = Path(root)
    if not (root / 'meta.json').exists():
        raise FileNotFoundError(f'no shapes dataset at {root}: run `python data.py --root {root}`')
    n = json.loads((root / 'meta.json').read_text())['n_shards']
    return dict(root=str(root), shards=str(root / f'shards/train-{{000000..{n - 1:06d}}}.tar'),
                train=str(root / 'train'), val=str(root / 'val'), n_shards=n)


def shapes_object_patches(paths, transform, patch_size):
    """(n, N) bool, row-major: which patches of the shapes val images `paths` (root/val/<class>/<index>.jpg,
    as written here) lie on a shape, the labelled one or a distractor, as the model sees them. Each
    mask goes through the same `transform` as its image (resize, crop); a patch is object when at
    least a third of its pixels are. None when `paths` are not the val images of a shapes dataset."""
    paths = [Path(p).resolve() for p in paths]
    root = paths[0].parent.parent.parent if paths else Path()
    mask_file = root / 'val_masks.npy'
    if not mask_file.exists() or any(p.parent.parent != root / 'val' or not p.stem.isdigit() for p in paths):
        return None
    stems = [p.stem for p in paths]
    masks = np.load(mask_file)
    mean, std = open_clip.OPENAI_DATASET_MEAN[0], open_clip.OPENAI_DATASET_STD[0]
    out = []
    for stem in stems:
        # the transform normalises with CLIP's mean and std: undo it to read the share back
        share = transform(Image.fromarray(masks[int(stem)]).convert('RGB'))[0] * std + mean
        share = torch.nn.functional.avg_pool2d(share[None, None], patch_size)
        out.append(share.flatten() >= 1 / 3)
    return torch.stack(out)


# -----------------------------------------------------------------------------
# ImageNet-style folders

LAYOUT = """expected an ImageFolder layout, one sub-folder per class, e.g.
  {root}/train/n01440764/n01440764_10026.JPEG
  {root}/train/n01443537/...
  {root}/val/n01440764/ILSVRC2012_val_00000293.JPEG
  {root}/val/n01443537/...
(ImageNet's val images come as one flat folder: sort them into class folders first)"""


def load_image(fp):
    """An image file (a path or a file object) as an RGB PIL image, fully decoded. 16-bit greyscale, as
    PIL opens a 16-bit PNG (mode 'I;16', or 'I' in older Pillow), is scaled to 8 bits first: convert('RGB')
    clips it at 255, so such an image came out all white."""
    with Image.open(fp) as image:
        if image.mode.startswith('I'):
            pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)  # 'I' (int32): a 16-bit PNG's range
            image = Image.fromarray(np.round(pixels / 257).astype(np.uint8), 'L')
        return image.convert('RGB')  # convert() forces the full decode, before the file closes


WNID_RANGE = ('n01440764', 'n15075141')  # the first and last ImageNet-1k class, sorted


def image_transforms(image_size):
    """(train, val) image transforms from OpenCLIP: RGB, resize/crop, CLIP mean/std."""
    return (open_clip.image_transform(image_size, is_train=True),
            open_clip.image_transform(image_size, is_train=False))


def imagenet_dataset(root, split, transform=None):
    """torchvision ImageFolder over root/split ('train' or 'val'); .classes is the sorted
    folder names, targets index into it. Works for data/shapes too. Fails loudly with
    the expected layout when the folder is missing or malformed."""
    path = os.path.join(root, split)
    layout = LAYOUT.format(root=root)
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path} is not a directory; {layout}')
    if not any(entry.is_dir() for entry in os.scandir(path)):
        raise ValueError(f'{path} has no class sub-folders; {layout}')
    try:
        return SkippingImageFolder(path, transform, loader=load_image)
    except FileNotFoundError as e:  # ImageFolder: some class folder holds no images
        raise ValueError(f'{path}: {e}; {layout}') from None


def check_imagenet_classes(root, split):
    """root/split must hold ImageNet's 1000 class folders, whose sorted order is the order of OpenCLIP's
    IMAGENET_CLASSNAMES: a folder too few would shift every label after it, and another dataset would
    be scored against the wrong names. Folders named like wnids must run from the first ImageNet-1k
    wnid to the last (the full list is not at hand). Raises ValueError (or imagenet_dataset's errors)."""
    classes = imagenet_dataset(root, split).classes
    if len(classes) != 1000:
        raise ValueError(f'{os.path.join(root, split)} has {len(classes)} class folders, but zero-shot ImageNet '
                         f'labels need all 1000 (n01440764 ... n15075141)')
    if any(re.fullmatch(r'n\d{8}', c) for c in classes) and (
            not all(re.fullmatch(r'n\d{8}', c) for c in classes) or (classes[0], classes[-1]) != WNID_RANGE):
        raise ValueError(f'{os.path.join(root, split)}: the class folders are not ImageNet-1k\'s wnids '
                         f'(sorted, they must run from {WNID_RANGE[0]} to {WNID_RANGE[1]}; '
                         f'here {classes[0]} to {classes[-1]})')


class SkippingImageFolder(ImageFolder):
    """An ImageFolder whose unreadable images are skipped and counted (in .skipped, shared memory, so
    dataloader workers add to it), as bad samples in shards are: one corrupt file among a million must
    not end a run, nor end its resume at the same step every time. An item is None instead; collate()
    drops it from its batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = mp.Value('i', 0)

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except Exception as exn:
            _skip(self.skipped, RuntimeError(f'{self.samples[index][0]}: {exn!r}'))
            return None


def collate(batch):
    """default_collate of the readable items of a SkippingImageFolder batch (None: all unreadable)."""
    batch = [item for item in batch if item is not None]
    return torch.utils.data.default_collate(batch) if batch else None


def worker_init(worker_id):
    """Every DataLoader's workers outlive a SIGTERM sent to the whole job (a scheduler such as Slurm
    signals every process): the training process catches it, finishes its step and saves, and it
    needs its workers to get there. They end when their loader shuts them down, or at the latest
    when the training process exits (end_workers)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_workers():
    """At exit, SIGKILL the daemonic children still alive: the loader workers (persistent ones, or one
    stuck on a slow read). multiprocessing's own exit handler would SIGTERM them, which they ignore, and
    then wait for them forever. It was registered when multiprocessing.util was imported (above), so it
    runs after this one."""
    for p in mp.active_children():
        if p.daemon:
            p.kill()
            p.join()


atexit.register(end_workers)


def folder_loader(root, split, transform, batch_size, workers=2, train=False):
    """DataLoader over imagenet_dataset(root, split, transform) yielding (images, labels), without
    the unreadable images (counted in loader.dataset.skipped); None for a batch with none readable.
    train=True shuffles and drops the last partial batch; False keeps order (eval)."""
    return torch.utils.data.DataLoader(imagenet_dataset(root, split, transform), batch_size,
                                       shuffle=train, drop_last=train, num_workers=workers,
                                       persistent_workers=workers > 0, collate_fn=collate, worker_init_fn=worker_init)


# -----------------------------------------------------------------------------
# Webdataset shards (img2dataset output: CC12M, LAION, the shapes shards)

def expand_urls(urls):
    """'a/{000..009}.tar::b/{00..03}.tar' or a list of such patterns -> list of paths/urls."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    return [u for p in patterns for u in wds.shardlists.expand_urls(p)]


def _rank_and_world_size(rank, world_size):
    """The given rank and world size, else torch.distributed's, else a single process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)


def _worker():
    info = torch.utils.data.get_worker_info()  # None in the main process (workers=0)
    return (info.id, info.num_workers) if info else (0, 1)


def _skip(skipped, exn, shard=False):
    """Count a bad sample (or unreadable shard) in shared memory and carry on. Returns True,
    which is how webdataset handlers say 'continue'. shard=True: the tar reader failed, and the
    rest of the shard (up to all its samples, one count) is lost, or (a member name repeated within a
    sample) webdataset keeps the first and drops the repeat: always say which shard."""
    with skipped.get_lock():
        skipped.value += 1
        n = skipped.value
    if shard:
        lost = 'a repeated member of a sample' if 'duplicate file name' in str(exn) else 'the rest of a shard'
        logging.warning(f'skipping {lost} (#{n} skipped): {exn!r}')
    elif n <= 10:  # a few warnings for diagnosis; the count itself is on loader.skipped()
        logging.warning(f'skipping bad sample #{n}: {exn!r}')
    return True


def _shards(urls, seed, epoch, rank, world_size, shuffle, resampled):
    """First pipeline stage, run once per epoch in each worker: the shards this
    (rank, worker) reads, as {'url': ...} dicts for webdataset's tar reader."""
    worker, num_workers = _worker()
    if resampled:  # sample shards with replacement, forever; with_epoch ends the epoch
        rng = random.Random(f'{seed}-{epoch.value}-{rank}-{worker}')
        while True:
            yield dict(url=rng.choice(urls))
    urls = list(urls)
    if shuffle:  # same seed on every rank and worker, so the slices below stay disjoint
        random.Random(f'{seed}-{epoch.value}').shuffle(urls)
    for url in urls[rank::world_size][worker::num_workers]:
        yield dict(url=url)


def _expected_samples(url):
    """The samples img2dataset wrote into a local shard ('successes' in the {shard}_stats.json it writes
    next to it), or None."""
    try:
        with open(re.sub(r'\.tar$', '_stats.json', url)) as f:
            return int(json.load(f)['successes'])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _count_shards(samples, skipped):
    """Pass samples through, counting each shard's: a shard cut short (a truncated tar can end without
    an error) yields fewer than its stats file records; the samples lost go into the skip count, and
    the shard is named. (A shard that fails before its first sample counts one, in _skip.)"""
    url, n = None, 0
    for sample in itertools.chain(samples, [None]):
        if sample is None or sample['__url__'] != url:
            expected = _expected_samples(url) if url else None
            if expected and n < expected:
                with skipped.get_lock():
                    skipped.value += expected - n
                logging.warning(f'shard {url}: {expected - n} of its {expected} samples missing (cut short?)')
            if sample is None:
                return
            url, n = sample['__url__'], 0
        n += 1
        yield sample


def _shuffle(samples, bufsize, seed, epoch, rank):
    """Shuffle buffer: keep `bufsize` samples, emit a random one as each new one arrives."""
    worker, _ = _worker()
    rng = random.Random(f'{seed}-{epoch.value}-{rank}-{worker}-samples')
    buf = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


def _decode(samples, transform, tokenizer, with_labels, skipped):
    """Raw tar sample dicts -> (image, tokens[, label]); anything broken is counted and skipped."""
    for sample in samples:
        try:
            ext = next((e for e in ('jpg', 'jpeg', 'png', 'webp') if e in sample), None)
            if ext is None or 'txt' not in sample or (with_labels and 'cls' not in sample):
                raise KeyError(f'{sample.get("__key__")}: missing image/caption/label, has {sorted(sample)}')
            image = load_image(io.BytesIO(sample[ext]))
            out = (transform(image), tokenizer([sample['txt'].decode('utf-8')])[0])
            if with_labels:
                out += (int(sample['cls']),)
        except Exception as exn:
            _skip(skipped, exn)
            continue
        yield out


def _collate(samples):
    images, texts, *labels = zip(*samples)
    return (torch.stack(images), torch.stack(texts)) + tuple(torch.tensor(l) for l in labels)


def wds_loader(urls, transform, tokenizer, batch_size, num_samples=None, train=True, workers=2,
               resampled=False, seed=0, epoch=0, rank=None, world_size=None, with_labels=False,
               shuffle_buffer=1000):
    """DataLoader over webdataset shards (img2dataset layout) yielding batches
        (images FloatTensor [B,3,H,W], texts LongTensor [B,context_length])
    or (images, texts, labels LongTensor [B]) with with_labels=True (needs .cls members).

    urls: brace pattern like '/data/cc12m/{00000..01242}.tar', '::'-joined patterns, or a list.
    tokenizer: OpenCLIP tokenizer, e.g. open_clip.get_tokenizer('ViT-B-32').
    Shards are split across ranks (rank/world_size default to torch.distributed, else 0/1)
    and then across dataloader workers, so every reader sees disjoint shards; with
    resampled=True each reader instead draws shards with replacement (multi-node runs).
    train=True: shards and samples are shuffled (reproducibly, from seed + epoch), and an
    epoch is num_batches = ceil(num_samples / (batch_size * world_size)) full batches per
    rank (rounded up to a multiple of workers); readers loop over their shards to fill it.
    train=False: one ordered pass over this rank's shards, last batch partial.

    The returned loader also has:
      .num_batches, .num_samples   per-epoch length on this rank (eval: a rough estimate,
                                   None without num_samples)
      .set_epoch(e)                call before iterating epoch e to reseed the shuffles
      .skipped()                   bad samples / shard errors skipped so far, all workers, plus
                                   the samples missing from shards cut short (img2dataset's
                                   {shard}_stats.json says how many a shard holds)
    """
    rank, world_size = _rank_and_world_size(rank, world_size)
    urls = expand_urls(urls)
    if train and num_samples is None:
        raise ValueError('train=True needs num_samples (img2dataset shards do not record their size)')
    if train and not resampled and len(urls) < world_size * max(1, workers):
        raise ValueError(f'{len(urls)} shards cannot be split over {world_size} ranks x {workers} workers')
    # multiprocessing.Values live in shared memory: dataloader worker processes see
    # set_epoch() from the main process, and the main process sees their skip counts.
    epoch_value, skipped = mp.Value('i', epoch), mp.Value('i', 0)
    stages = [partial(_shards, urls, seed, epoch_value, rank, world_size, shuffle=train, resampled=resampled),
              wds.tarfile_to_samples(handler=partial(_skip, skipped, shard=True)),
              partial(_count_shards, skipped=skipped)]
    if train:
        stages.append(partial(_shuffle, bufsize=shuffle_buffer, seed=seed, epoch=epoch_value, rank=rank))
    stages += [partial(_decode, transform=transform, tokenizer=tokenizer, with_labels=with_labels, skipped=skipped),
               wds.batched(batch_size, collation_fn=_collate, partial=not train)]
    dataset = wds.DataPipeline(*stages)

    num_batches = math.ceil(num_samples / batch_size) if num_samples else None
    if train:
        # Each worker yields the same number of batches, so every rank runs the same
        # number of steps (DDP would hang if one rank stopped early).
        per_worker = math.ceil(num_samples / (batch_size * world_size) / max(1, workers))
        num_batches = per_worker * max(1, workers)
        num_samples = num_batches * batch_size * world_size
        dataset = dataset.with_epoch(per_worker)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         persistent_workers=workers > 0, worker_init_fn=worker_init)
    loader.num_batches, loader.num_samples = num_batches, num_samples

    def set_epoch(e):
        epoch_value.value = e

    loader.set_epoch, loader.skipped = set_epoch, lambda: skipped.value
    return loader


def memory_loader(urls, transform, tokenizer, batch_size, num_samples=None, seed=0, rank=None, world_size=None):
    """The training batches of wds_loader for a set small enough to hold in RAM (the shapes demo).
    Every sample of the shards (or the first num_samples, in shard order) is decoded ONCE, by the
    same _decode (bad samples skipped and counted), and each epoch serves reshuffled full batches of
    the cached tensors, split across ranks by DistributedSampler. Why: on 2 CPU cores, decoding and
    transforming 128 images costs ~90 ms of a ~0.3 s step, every step, and worker processes would
    compete with the model for the cores. The price: the transform's randomness (random crops) is
    drawn once per image rather than once per epoch. Same interface as wds_loader(train=True)."""
    rank, world_size = _rank_and_world_size(rank, world_size)
    skipped = mp.Value('i', 0)
    samples = wds.DataPipeline(wds.SimpleShardList(expand_urls(urls)),
                               wds.tarfile_to_samples(handler=partial(_skip, skipped, shard=True)),
                               partial(_decode, transform=transform, tokenizer=tokenizer, with_labels=False,
                                       skipped=skipped))
    samples = list(itertools.islice(samples, num_samples or None))
    if len(samples) < batch_size * world_size:
        raise ValueError(f'{urls}: {len(samples)} samples, fewer than one batch of {batch_size} x {world_size} ranks')
    dataset = torch.utils.data.TensorDataset(*_collate(samples))
    del samples
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    # Batches are drawn by index lists (TensorDataset indexes all its tensors at once): no per-sample collate.
    loader = torch.utils.data.DataLoader(dataset, batch_size=None,
                                         sampler=torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True))
    loader.num_batches, loader.num_samples = len(loader), len(loader) * batch_size * world_size
    loader.set_epoch, loader.skipped = sampler.set_epoch, lambda: skipped.value
    return loader


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Generate the built-in shapes dataset.')
    parser.add_argument('--style', default='colour', choices=SHAPES_STYLES)
    parser.add_argument('--root', default=None, help='default: data/shapes (colour), data/shapes-<style> else')
    parser.add_argument('--n-train', type=int, default=10000)
    parser.add_argument('--n-val', type=int, default=1500)
    parser.add_argument('--image-size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--shard-size', type=int, default=1000)
    parser.add_argument('--workers', type=int, default=None, help='processes (default: all cores)')
    args = parser.parse_args()
    s = make_shapes(args.root, args.n_train, args.n_val, args.image_size, args.seed, args.shard_size, args.workers,
                    args.style)
    print(f"{'generated' if s['generated'] else 'already up to date'}: {s['root']} "
          f"({s['bytes'] / 1e6:.1f} MB, {s['seconds']:.1f} s)")
    print(f"  {s['n_train']} train + {s['n_val']} val images, {s['image_size']}x{s['image_size']} px, "
          f"{s['n_classes']} classes: {', '.join(s['classnames'])}")
    print(f"  shards: {s['shards']}\n  train:  {s['train']}\n  val:    {s['val']}")
