"""Tests for data.py. Tiny datasets in tmp dirs; the whole file runs in seconds."""
import builtins
import errno
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

import data
from conftest import read_shard, write_tar

SMALL = dict(n_train=64, n_val=60, image_size=32, shard_size=16)  # 4 shards of 16


@pytest.fixture(scope='session')
def shapes(tmp_path_factory):
    return data.make_shapes(tmp_path_factory.mktemp('shapes') / 'shapes', workers=1, **SMALL)


@pytest.fixture(scope='session')
def tokenizer():
    return open_clip.get_tokenizer('ViT-B-32')


def read_tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


def fingerprint(image):
    return hashlib.sha1((image * 1000).round().to(torch.int32).numpy().tobytes()).hexdigest()


def collect(loader):
    images, texts, *labels = [torch.cat(x) for x in zip(*loader)]
    return images, texts, (labels[0] if labels else None)


def test_generation_deterministic_and_idempotent(tmp_path):
    small = dict(SMALL, n_train=40, n_val=30)
    a = data.make_shapes(tmp_path / 'a', workers=1, **small)
    b = data.make_shapes(tmp_path / 'b', workers=2, **small)  # parallelism must not matter
    tree_a, tree_b = read_tree(tmp_path / 'a'), read_tree(tmp_path / 'b')
    assert a['generated'] and b['generated']
    assert len(tree_a) == 3 + 40 + 30 + 2  # 3 shards, train + val jpgs, val_masks.npy, meta.json
    assert tree_a == tree_b
    assert not (tmp_path / 'a.tmp').exists()
    train_jpgs = {v for k, v in tree_a.items() if k.startswith('train/')}
    assert not train_jpgs & {v for k, v in tree_a.items() if k.startswith('val/')}  # held out

    c = data.make_shapes(tmp_path / 'c', seed=1, workers=1, **small)
    tree_c = read_tree(tmp_path / 'c')
    assert tree_c.keys() == tree_a.keys()
    assert all(tree_c[k] != tree_a[k] for k in tree_a if k.endswith('.tar') or k.endswith('.jpg'))

    # Idempotent: same parameters -> nothing rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / 'a').rglob('*')}
    again = data.make_shapes(tmp_path / 'a', workers=1, **small)
    assert not again['generated']
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / 'a').rglob('*')}
    # Different parameters, or a dataset without meta.json (never finished) -> regenerated.
    assert data.make_shapes(tmp_path / 'a', workers=1, **dict(small, n_val=60))['generated']
    assert len(list((tmp_path / 'a' / 'val').rglob('*.jpg'))) == 60
    (tmp_path / 'a' / 'meta.json').unlink()
    assert data.make_shapes(tmp_path / 'a', workers=1, **small)['generated']
    assert read_tree(tmp_path / 'a') == tree_a


def tree_state(top):
    """Everything a write of any kind changes under top (top itself included): each entry's type, mode, inode,
    link count, size, modification time (a directory's moves when an entry is created, renamed or removed, even
    one deleted again at once), and a file's bytes (caught even where a write puts the mtime back)."""
    state = {}
    for p in [Path(top), *sorted(Path(top).rglob('*'))]:
        st = p.lstat()
        state[str(p)] = (st.st_mode, st.st_ino, st.st_nlink, st.st_size, st.st_mtime_ns,
                         hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
    return state


def age(top):
    """Set every timestamp under top (top included) to 2001: a write now moves it, even within the clock tick
    in which the entry was last written."""
    for p in [Path(top), *Path(top).rglob('*')]:
        os.utime(p, ns=(10 ** 18, 10 ** 18), follow_symlinks=False)


def test_a_complete_dataset_is_only_read(tmp_path, monkeypatch):
    """A finished dataset on a read-only mount (a shared data folder) is used as it is: no lock file, no write of
    any kind. Tests run as root, whom permissions do not stop, so a write is caught after the fact: the state of
    the whole folder the dataset sits in (its lock file goes beside it), before and after. data.py's own open()
    also refuses writes, as a read-only mount would. The check is checked too: it sees the lock file reopened
    for writing (still empty), an entry made and removed at once, a byte changed with the mtime put back."""
    small = dict(SMALL, n_train=40, n_val=30)
    data.make_shapes(tmp_path / 's', workers=1, **small)
    age(tmp_path)
    before = tree_state(tmp_path)

    def read_only(file, mode='r', *args, **kwargs):
        if any(c in mode for c in 'wax+'):
            raise OSError(errno.EROFS, 'Read-only file system', str(file))
        return builtins.open(file, mode, *args, **kwargs)
    monkeypatch.setattr(data, 'open', read_only, raising=False)  # data.py's own open() calls
    again = data.make_shapes(tmp_path / 's', workers=1, **small)
    assert not again['generated'] and again['n_train'] == 40 and again['n_shards'] == 3
    after = tree_state(tmp_path)
    assert after == before, {p: (before.get(p), after.get(p)) for p in before.keys() | after.keys()
                             if before.get(p) != after.get(p)}

    # The check is checked: it sees writes that change no size, as the generating path's lock file would make
    meta = tmp_path / 's' / 'meta.json'
    writes = dict(lock_reopened=lambda: builtins.open(tmp_path / 's.lock', 'w').close(),
                  entry_made_and_removed=lambda: ((tmp_path / 's' / 'x').touch(), (tmp_path / 's' / 'x').unlink()),
                  byte_changed_mtime_put_back=lambda: (meta.write_bytes(b'[' + meta.read_bytes()[1:]), age(tmp_path)))
    for name, write in writes.items():
        assert tree_state(tmp_path) == before, name
        write()
        assert tree_state(tmp_path) != before, name
        age(tmp_path)


def test_concurrent_generation_is_safe(tmp_path):
    """Two callers at once (e.g. DDP ranks): one generates, the other waits and reuses it."""
    results = []
    run = lambda: results.append(data.make_shapes(tmp_path / 's', workers=1, **dict(SMALL, n_train=32, n_val=30)))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r['generated'] for r in results) == [False, True]
    assert len(list((tmp_path / 's').rglob('*.jpg'))) == 62


def test_shards_read_back(shapes, tokenizer):
    assert shapes['n_shards'] == 4
    _, val_tf = data.image_transforms(32)
    loader = data.wds_loader(shapes['shards'], val_tf, tokenizer, batch_size=10, train=False,
                             workers=0, with_labels=True)
    images, texts, labels = collect(loader)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert texts.shape == (64, 77) and texts.dtype == torch.long
    assert loader.skipped() == 0

    # Compare with the raw tar contents, in order (train=False keeps shard order).
    raw = {}
    for url in data.expand_urls(shapes['shards']):
        raw.update(read_shard(url))
    keys = sorted(raw)
    captions = [raw[k]['txt'].decode() for k in keys]
    assert torch.equal(texts, tokenizer(captions))
    assert labels.tolist() == [int(raw[k]['cls']) for k in keys]
    for key, caption, label in zip(keys, captions, labels.tolist()):
        colour, shape = data.SHAPES_CLASSNAMES[label].split()
        assert f'{colour} {shape}' in caption and caption.startswith(('a ', 'an ', 'there '))
        meta = json.loads(raw[key]['json'])
        assert meta['key'] == key and meta['status'] == 'success' and meta['caption'] == caption
        assert meta['label'] == label and meta['width'] == meta['height'] == 32
        # the ImageFolder copy holds the same JPEG under the right class folder
        assert (Path(shapes['train']) / data._class_dir(label) / f'{key}.jpg').read_bytes() == raw[key]['jpg']
    assert fingerprint(images[5]) == fingerprint(val_tf(Image.open(io.BytesIO(raw[keys[5]]['jpg']))))
    assert len(set(labels.tolist())) == 30


def test_train_epochs_shuffle_reproducibly(shapes, tokenizer):
    train_tf, _ = data.image_transforms(32)

    def epoch_texts(urls, n, epoch):
        loader = data.wds_loader(urls, train_tf, tokenizer, batch_size=4, num_samples=n, workers=0,
                                 shuffle_buffer=8, with_labels=True)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == loader.num_batches == n // 4
        assert all(b[0].shape == (4, 3, 32, 32) and b[2].shape == (4,) for b in batches)
        return torch.cat([b[1] for b in batches])

    # All shards (shard order and sample order shuffle), then a single shard (sample shuffle only).
    for urls, n in ((shapes['shards'], 64), (data.expand_urls(shapes['shards'])[0], 16)):
        ordered = collect(data.wds_loader(urls, train_tf, tokenizer, 4, train=False, workers=0))[1]
        e0, e1 = epoch_texts(urls, n, 0), epoch_texts(urls, n, 1)
        assert torch.equal(e0, epoch_texts(urls, n, 0))  # reproducible
        assert not torch.equal(e0, e1) and not torch.equal(e0, ordered)  # reshuffled each epoch
        key = lambda t: sorted(map(tuple, t.tolist()))
        assert key(e0) == key(e1) == key(ordered)  # one epoch = every sample exactly once here


def test_shard_assignment_is_a_partition(monkeypatch):
    """Every (rank, worker) reader gets a disjoint slice of the same per-epoch shuffle."""
    urls = sorted(f's{i:02d}.tar' for i in range(23))
    for seed in range(5):
        first_reader = set()
        for epoch in range(4):
            slices = []
            for rank in range(3):
                for worker in range(2):
                    monkeypatch.setattr(data, '_worker', lambda: (worker, 2))
                    shards = data._shards(urls, seed, SimpleNamespace(value=epoch), rank, 3, True, False)
                    slices.append([s['url'] for s in shards])
            assert sorted(sum(slices, [])) == urls and all(len(s) in (3, 4) for s in slices)
            first_reader.add(tuple(slices[0]))
        assert len(first_reader) > 1  # a different shard order each epoch


@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_samples_are_skipped_and_counted(shapes, tokenizer, tmp_path, workers):
    good = sorted(read_shard(data.expand_urls(shapes['shards'])[0]).items())
    jpg = good[0][1]['jpg']
    bad = [('bad0', dict(good[0][1], jpg=b'this is not a jpeg')),               # undecodable
           ('bad1', {k: v for k, v in good[1][1].items() if k != 'txt'}),       # no caption
           ('bad2', dict(good[2][1], jpg=jpg[:len(jpg) // 2])),                 # truncated
           ('bad3', {k: v for k, v in good[3][1].items() if k != 'jpg'})]       # no image
    write_tar(tmp_path / 'x0.tar', good[:8] + bad[:2] + good[8:10])
    write_tar(tmp_path / 'x1.tar', bad[2:] + good[10:16])
    (tmp_path / 'x2.tar').write_bytes(b'garbage, not a tar file' * 100)  # unreadable shard: 1 error
    _, val_tf = data.image_transforms(32)
    loader = data.wds_loader(str(tmp_path / 'x{0..2}.tar'), val_tf, tokenizer, batch_size=4,
                             train=False, workers=workers, with_labels=True)
    images, texts, labels = collect(loader)
    assert len(images) == len(texts) == 16
    assert sorted(labels.tolist()) == sorted(int(s['cls']) for _, s in good[:16])
    assert loader.skipped() == 5


def test_ranks_and_workers_read_disjoint_shards(shapes, tokenizer):
    _, val_tf = data.image_transforms(32)  # deterministic transform -> stable fingerprints
    everything = collect(data.wds_loader(shapes['shards'], val_tf, tokenizer, 16, train=False, workers=0))[0]
    reference = {fingerprint(im) for im in everything}
    assert len(reference) == 64

    # 2 ranks x 2 workers, 4 shards of 16: an epoch of 64 samples is exactly one shard per reader.
    seen = []
    for rank in (0, 1):
        loader = data.wds_loader(shapes['shards'], val_tf, tokenizer, batch_size=8, num_samples=64,
                                 workers=2, rank=rank, world_size=2, seed=3)
        assert loader.num_batches == 4
        images = collect(loader)[0]
        seen.append({fingerprint(im) for im in images})
        assert len(images) == len(seen[-1]) == 32
    assert not seen[0] & seen[1] and seen[0] | seen[1] == reference

    # Too few shards for the readers is refused instead of silently starving some.
    with pytest.raises(ValueError, match='shards'):
        data.wds_loader(shapes['shards'], val_tf, tokenizer, 8, num_samples=64, workers=3, rank=0, world_size=2)
    # Resampled: any number of readers, each draws its own shards with replacement.
    streams = []
    for rank in (0, 1):
        loader = data.wds_loader(shapes['shards'], val_tf, tokenizer, batch_size=8, num_samples=64,
                                 workers=0, rank=rank, world_size=4, resampled=True)
        batches = list(loader)
        assert len(batches) == loader.num_batches == 2
        streams.append([fingerprint(im) for b in batches for im in b[0]])
        assert set(streams[-1]) <= reference
    assert streams[0] != streams[1]


def test_missing_or_malformed_imagenet_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.imagenet_dataset(tmp_path / 'imagenet', 'val')
    assert 'is not a directory' in str(e.value) and 'imagenet/val/n01440764/' in str(e.value)

    flat = tmp_path / 'flat' / 'val'  # ImageNet val as downloaded: images not sorted into classes
    flat.mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(flat / 'ILSVRC2012_val_00000001.JPEG')
    with pytest.raises(ValueError, match='no class sub-folders') as e:
        data.imagenet_dataset(tmp_path / 'flat', 'val')
    assert 'flat/train/n01440764/' in str(e.value)

    (tmp_path / 'empty' / 'train' / 'n01440764').mkdir(parents=True)
    with pytest.raises(ValueError, match='n01440764') as e:
        data.imagenet_dataset(tmp_path / 'empty', 'train')
    assert 'expected an ImageFolder layout' in str(e.value)


def test_imagefolder_classes_and_zero_shot_templates(shapes, tokenizer):
    for split, n in (('train', 64), ('val', 60)):
        folder = ImageFolder(shapes[split])
        assert [c.split('_', 1)[1].replace('_', ' ') for c in folder.classes] == data.SHAPES_CLASSNAMES
        assert len(folder) == n
    # val holds 2 images per class, and labels match the folder's class name
    loader = data.folder_loader(shapes['root'], 'val', data.image_transforms(32)[1], batch_size=25, workers=0)
    images, labels = [torch.cat(x) for x in zip(*loader)]
    assert images.shape == (60, 3, 32, 32) and torch.bincount(labels).tolist() == [2] * 30
    assert loader.dataset.classes[7].endswith(data.SHAPES_CLASSNAMES[7].replace(' ', '_'))

    assert all(t('red circle').count('red circle') == 1 for t in data.SHAPES_TEMPLATES)

    class BagOfTokens(torch.nn.Module):  # stand-in text tower: embedding = token histogram
        def encode_text(self, texts, normalize=False):
            emb = torch.zeros(len(texts), 50000).scatter_add_(1, texts, torch.ones_like(texts, dtype=torch.float))
            return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    weights = open_clip.build_zero_shot_classifier(BagOfTokens(), tokenizer, data.SHAPES_CLASSNAMES,
                                                   data.SHAPES_TEMPLATES, device='cpu')
    assert weights.shape == (50000, 30)
    # each class's prompts are closest to its own classifier column
    own = BagOfTokens().encode_text(tokenizer([f'a photo of a {c}.' for c in data.SHAPES_CLASSNAMES]), True)
    assert (own @ weights).argmax(1).tolist() == list(range(30))


def test_memory_loader_serves_each_decoded_sample_once_per_epoch(shapes, tokenizer, tmp_path):
    _, val_tf = data.image_transforms(32)
    images, texts, _ = collect(data.wds_loader(shapes['shards'], val_tf, tokenizer, 16, train=False, workers=0))
    pairs = {(fingerprint(im), tuple(t.tolist())) for im, t in zip(images, texts)}
    assert len(pairs) == 64

    def epoch(rank, e):
        loader = data.memory_loader(shapes['shards'], val_tf, tokenizer, batch_size=8, seed=3, rank=rank, world_size=2)
        assert loader.num_batches == 4 and loader.num_samples == 64 and loader.skipped() == 0
        loader.set_epoch(e)
        batches = list(loader)
        assert len(batches) == 4 and all(len(b[0]) == len(b[1]) == 8 for b in batches)
        return [(fingerprint(im), tuple(t.tolist())) for b in batches for im, t in zip(*b)]

    # Two ranks split each epoch into disjoint halves of the same image-caption pairs wds_loader reads.
    e0 = [epoch(rank, 0) for rank in (0, 1)]
    assert not set(e0[0]) & set(e0[1]) and set(e0[0]) | set(e0[1]) == pairs
    # Each epoch is reshuffled (reproducibly from seed + epoch), still disjoint across ranks.
    e1 = [epoch(rank, 1) for rank in (0, 1)]
    assert e1[0] != e0[0] and set(e1[0]) | set(e1[1]) == pairs
    assert epoch(0, 1) == e1[0]
    # num_samples keeps the first samples in shard order: what the tiny test configs train on.
    first = data.memory_loader(shapes['shards'], val_tf, tokenizer, batch_size=4, num_samples=20, rank=0, world_size=1)
    assert first.num_batches == 5
    assert {fingerprint(im) for b in first for im in b[0]} == {fingerprint(im) for im in images[:20]}

    # Broken samples are skipped and counted at load time, as in wds_loader.
    good = sorted(read_shard(data.expand_urls(shapes['shards'])[0]).items())
    write_tar(tmp_path / 'x0.tar', good[:8] + [('bad', dict(good[8][1], jpg=b'not a jpeg'))] + good[9:12])
    (tmp_path / 'x1.tar').write_bytes(b'garbage, not a tar file' * 100)
    loader = data.memory_loader(str(tmp_path / 'x{0..1}.tar'), val_tf, tokenizer, batch_size=4, rank=0, world_size=1)
    assert loader.skipped() == 2 and loader.num_samples == 8  # 11 good samples, 2 full batches of 4
    with pytest.raises(ValueError, match='fewer than one batch'):
        data.memory_loader(str(tmp_path / 'x0.tar'), val_tf, tokenizer, batch_size=64, rank=0, world_size=1)


def test_object_masks_mark_the_coloured_shapes_as_the_model_sees_them(shapes):
    """The val masks come from the generator itself; read through the val transform, the patches
    they mark as object are exactly where the image is strongly coloured (the backgrounds are grey)."""
    image_size, patch = 24, 4  # resized from the data's 32 px, as the model would see them
    transform = data.image_transforms(image_size)[1]
    paths = [p for p, _ in ImageFolder(shapes['val']).samples]
    objects = data.shapes_object_patches(paths, transform, patch)
    assert objects.shape == (60, (image_size // patch) ** 2) and objects.dtype == torch.bool
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    saturation = []
    for path in paths:
        with Image.open(path) as im:
            rgb = transform(im) * std[:, None, None] + mean[:, None, None]
        sat = rgb.max(0).values - rgb.min(0).values  # 0 on grey
        saturation.append(torch.nn.functional.avg_pool2d(sat[None, None], patch).flatten())
    saturation = torch.stack(saturation)
    assert objects.any(1).all() and (~objects).any(1).all()  # every image has both
    assert saturation[objects].mean() > 3 * saturation[~objects].mean()
    assert (saturation[~objects] < 0.25).float().mean() > 0.95  # background patches are grey
    # the mask follows the file name: another image's mask marks other patches
    assert not torch.equal(objects, data.shapes_object_patches(paths[1:] + paths[:1], transform, patch))


def test_object_masks_are_only_given_for_shapes_val_images(shapes, tmp_path):
    transform = data.image_transforms(32)[1]
    train = [p for p, _ in ImageFolder(shapes['train']).samples][:4]
    assert data.shapes_object_patches(train, transform, 4) is None
    other = tmp_path / 'val' / 'cat'
    other.mkdir(parents=True)
    Image.new('RGB', (32, 32)).save(other / 'photo.jpg')
    assert data.shapes_object_patches([str(other / 'photo.jpg')], transform, 4) is None


def to_tensor(image):
    """PIL RGB image -> uint8 (3, H, W), the decoded pixels themselves."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path, tokenizer):
    """A 16-bit greyscale PNG (PIL mode 'I;16') used to be clipped to all white by convert('RGB')."""
    levels = np.arange(0, 65536, 257 * 17, dtype=np.uint16)  # 0, 4369, ..., 65535: 8-bit 0, 17, ..., 255
    pixels = np.tile(levels, (16, 1))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='PNG')
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith('I')
    expected = torch.tensor(levels // 257, dtype=torch.uint8).expand(16, -1)

    (tmp_path / 'folder' / 'train' / 'grey').mkdir(parents=True)  # ImageFolder
    (tmp_path / 'folder' / 'train' / 'grey' / 'a.png').write_bytes(buf.getvalue())
    image = to_tensor(data.imagenet_dataset(tmp_path / 'folder', 'train')[0][0])
    assert torch.equal(image, expected.expand(3, -1, -1))

    write_tar(tmp_path / 'shard.tar', [('a', dict(png=buf.getvalue(), txt=b'a grey ramp'))])  # webdataset shard
    images, _, _ = collect(data.wds_loader(str(tmp_path / 'shard.tar'), to_tensor, tokenizer, 1, train=False,
                                           workers=0))
    assert torch.equal(images[0], expected.expand(3, -1, -1))


@pytest.mark.parametrize('workers', [0, 2])
def test_unreadable_images_in_folders_are_skipped_and_counted(shapes, tmp_path, workers):
    root = tmp_path / 'imagenet'
    for i, c in enumerate(sorted(p.name for p in Path(shapes['val']).iterdir())[:3]):
        (root / 'val' / c).mkdir(parents=True)
        for j, image in enumerate(sorted((Path(shapes['val']) / c).iterdir())):
            (root / 'val' / c / image.name).write_bytes(image.read_bytes()[:100] if i == j == 0 else image.read_bytes())
        (root / 'val' / c / 'notes.jpg').write_bytes(b'not an image')
    loader = data.folder_loader(root, 'val', data.image_transforms(32)[1], batch_size=2, workers=workers)
    batches = list(loader)
    assert sum(len(b[1]) for b in batches if b is not None) == 6 - 1
    assert loader.dataset.skipped.value == 3 + 1  # 3 non-images, 1 truncated
    # a batch with no readable image is None, and evaluate() passes over it
    all_bad = data.folder_loader(root, 'val', data.image_transforms(32)[1], batch_size=1, workers=0)
    assert sum(b is None for b in all_bad) == 4


def test_imagenet_val_must_be_the_1000_classes(tmp_path):
    def make(names):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for name in names:
            (root / 'val' / name).mkdir(parents=True)
            Image.new('RGB', (4, 4)).save(root / 'val' / name / 'x.png')
        return root
    with pytest.raises(ValueError, match='has 3 class folders.*1000'):
        data.check_imagenet_classes(make(['a', 'b', 'c']), 'val')
    wnids = [f'n{i:08d}' for i in range(1440764, 1440764 + 999)] + ['n15075141']
    data.check_imagenet_classes(make(wnids), 'val')  # the right count, first and last
    with pytest.raises(ValueError, match='999 class folders'):
        data.check_imagenet_classes(make(wnids[1:]), 'val')  # one missing: every label would shift
    with pytest.raises(ValueError, match="not ImageNet-1k's wnids"):
        data.check_imagenet_classes(make(wnids[:-1] + ['n99999999']), 'val')


def test_a_broken_shard_is_always_named(shapes, tokenizer, tmp_path, caplog):
    """Warnings about bad samples stop after 10; an unreadable shard loses all of its samples in one
    count, so it is named however many samples were skipped before it."""
    good = sorted(read_shard(data.expand_urls(shapes['shards'])[0]).items())
    write_tar(tmp_path / 'x0.tar', [(k, dict(s, jpg=b'not a jpeg')) for k, s in good[:12]] + good[12:16])
    (tmp_path / 'x1.tar').write_bytes(b'garbage, not a tar file' * 100)
    loader = data.wds_loader(str(tmp_path / 'x{0..1}.tar'), data.image_transforms(32)[1], tokenizer, batch_size=4,
                             train=False, workers=0)
    assert sum(len(b[0]) for b in loader) == 4 and loader.skipped() == 13
    assert 'x1.tar' in caplog.text


def test_a_repeated_member_loses_no_sample(shapes, tokenizer, tmp_path, caplog):
    """A sample with its image twice in the tar (a writer that retried): the first is kept, the repeat is
    counted, and the warning says so rather than that the rest of the shard was lost."""
    good = sorted(read_shard(data.expand_urls(shapes['shards'])[0]).items())[:8]
    write_tar(tmp_path / 'x0.tar', good)
    with tarfile.open(tmp_path / 'x0.tar') as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / 'x0.tar', 'w') as tar:
        for m, blob in members:
            tar.addfile(m, io.BytesIO(blob))
            if m.name == f'{good[3][0]}.jpg':  # the same name again, right after it (another sample's image)
                again = tarfile.TarInfo(m.name)
                again.size = len(good[0][1]['jpg'])
                tar.addfile(again, io.BytesIO(good[0][1]['jpg']))
    loader = data.wds_loader(str(tmp_path / 'x0.tar'), data.image_transforms(32)[1], tokenizer, batch_size=4,
                             train=False, workers=0, with_labels=True)
    images, _, labels = collect(loader)
    assert len(images) == 8 and loader.skipped() == 1
    assert labels.tolist() == [int(s['cls']) for _, s in good]
    reference, _, _ = collect(data.wds_loader(shapes['shards'], data.image_transforms(32)[1], tokenizer, batch_size=8,
                                              train=False, workers=0, with_labels=True))
    assert torch.equal(images[3], reference[3]) and not torch.equal(images[3], images[0])  # the first one kept
    assert 'repeated member' in caplog.text and 'rest of a shard' not in caplog.text


def test_a_shard_cut_short_counts_its_lost_samples(shapes, tokenizer, tmp_path, caplog):
    """img2dataset records each shard's sample count in {shard}_stats.json: a shard truncated to a fifth
    counts every sample it lost (it used to count one, or none)."""
    good = sorted(read_shard(data.expand_urls(shapes['shards'])[0]).items())[:50]
    write_tar(tmp_path / 'x0.tar', good)
    blob = (tmp_path / 'x0.tar').read_bytes()
    (tmp_path / 'x0.tar').write_bytes(blob[:len(blob) // 5])
    (tmp_path / 'x0_stats.json').write_text(json.dumps(dict(count=55, successes=50)))
    loader = data.wds_loader(str(tmp_path / 'x0.tar'), data.image_transforms(32)[1], tokenizer, batch_size=4,
                             train=False, workers=0)
    n = sum(len(b[0]) for b in loader)
    assert 0 < n < 20 and loader.skipped() == 50 - n  # the missing ones and the one cut in half
    assert re.search(r'x0\.tar: \d+ of its 50 samples missing', caplog.text)


# Styles of the shapes data --------------------------------------------------------------------------

def components(mask):
    """The number of 4-connected regions of a bool (H, W) array (a flood fill: numpy has no labelling)."""
    seen, n = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        n, stack = n + 1, [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for q in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
    return n


def test_the_colour_style_draws_what_the_generator_drew_before_styles():
    """The default style is the data every recorded number was measured on: the same random stream, so the
    same captions (a pure function of it) as the generator before 'clutter' and 'count' were added."""
    captions = ''.join(data._render(i, 0, 1, 32)[1] for i in range(30))
    assert hashlib.sha1(captions.encode()).hexdigest() == 'a0b7539aebde64025f7a8cb2554681a2b727b40d'
    assert data._render(7, 0, 1, 32)[1] == data._render(7, 0, 1, 32, style='colour')[1]


@pytest.mark.parametrize('style', data.SHAPES_STYLES)
def test_every_style_has_its_own_folder_labels_and_prompts(tmp_path, monkeypatch, style):
    monkeypatch.setattr(data, 'SHAPES_ROOT', str(tmp_path / 'shapes'))
    assert data.shapes_root(style) == str(tmp_path / 'shapes') + ('' if style == 'colour' else f'-{style}')
    task = data.shapes_task(style)
    s = data.make_shapes(workers=1, style=style, **dict(SMALL, n_train=32))
    assert s['root'] == data.shapes_root(style) and s['classnames'] == task['classnames']
    folder = ImageFolder(s['val'])
    assert [c.split('_', 1)[1].replace('_', ' ') for c in folder.classes] == task['classnames']
    assert torch.bincount(torch.tensor(folder.targets)).tolist() == [60 // len(folder.classes)] * len(folder.classes)
    # every prompt names its class once; the shards' captions carry the labels' class names
    assert all(t(c).count(c) == 1 for t in task['templates'] for c in task['classnames'])
    for sample in read_shard(data.expand_urls(s['shards'])[0]).values():
        assert task['classnames'][int(sample['cls'])] in sample['txt'].decode()
    with pytest.raises(ValueError, match=r"shapes_style='texture': expected one of"):
        data.shapes_task('texture')


def test_count_scenes_hold_as_many_separate_shapes_as_their_label_and_caption_say():
    listed = []
    for i in range(60):
        jpg, caption, label, mask = data._render(i, 0, 1, 64, style='count')
        assert label == i % 6
        # the exact mask: label + 1 shapes, none touching another
        assert components(mask > 0) == label + 1, (i, caption)
        assert re.search(rf'\b{data.COUNT_CLASSNAMES[label]}(:| on a |\.$)', caption), caption
        listed.append(': ' in caption)
        if ': ' in caption:  # the list, when there is one, names each shape
            names = caption.split(': ', 1)[1].split(' on a ')[0].rstrip('.').replace(' and ', ', ').split(', ')
            assert len(names) == label + 1 and all(n[2:] in data.SHAPES_CLASSNAMES for n in names), caption
    assert 0.3 < np.mean(listed) < 0.7  # half the captions list the shapes


def test_clutter_puts_strong_colour_changes_all_over_the_background_and_keeps_the_mask_on_the_shapes():
    """'clutter' changes what surrounds the shapes, not what they are: the mask holds the shapes alone (the
    labelled one mostly in its own colour), and the background is a grey mosaic whose brightness varies far
    more than the default's backgrounds do, while staying grey."""
    spread = {style: [] for style in ('colour', 'clutter')}
    for i in range(0, 60, 2):
        for style in spread:
            jpg, caption, label, mask = data._render(i, 0, 1, 64, style=style)
            rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert('RGB')).astype(float)
            background = rgb[mask == 0]
            assert np.percentile(background.max(-1) - background.min(-1), 90) < 40, (style, i)  # grey
            spread[style].append(background.mean(-1).std())
            near = {name: (np.linalg.norm(rgb[mask == 255] - c, axis=-1) < 60).mean()
                    for name, c in data.COLOURS.items()}
            # the labelled shape is the largest thing in the mask: its colour is the mask's commonest
            assert max(near, key=near.get) == data.SHAPES_CLASSNAMES[label].split(' ')[0], (style, i)
    assert np.mean(spread['clutter']) > 2 * np.mean(spread['colour'])
