"""Tests of flops.py: fvcore's count against the closed form, the published ViT baselines, the
attention trap, the CLI, --checkpoint --data, and a tiny --bench smoke test."""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import data
import flops
import tome
from model import DTPConfig, DTPViT, fixed_boundaries, load_openclip

RATIOS = [1, 2, 4, 10]
# OpenCLIP's docs/model_profile.csv, image tower, 2 FLOPs per MAC (docs/method.md section 3)
OPENCLIP_GMACS = {'ViT-B-32': 8.82 / 2, 'ViT-B-16': 35.13 / 2}


@pytest.fixture(scope='module', params=['ViT-B-32', 'ViT-B-16'])
def table(request):
    rows, base, _ = flops.flop_rows(request.param, RATIOS)
    return request.param, rows, base


def test_fvcore_equals_closed_form(table):
    _, rows, base = table
    assert [r['pooling'] for r in rows] == ['none'] + ['dtp'] * len(RATIOS)
    N = base.n_patches
    for row in rows:
        cfg, S = base, None
        if row['pooling'] == 'dtp':
            cfg = dataclasses.replace(base, boundary='gumbel', compression=row['ratio'])
            S = cfg.n_segments
        closed = sum(flops.closed_form(cfg, S).values())
        assert row['macs'] == pytest.approx(closed, rel=0.005), row


def test_plain_vit_matches_openclip_published_count(table):
    arch, rows, _ = table
    assert rows[0]['gmacs'] == pytest.approx(OPENCLIP_GMACS[arch], rel=0.005)
    assert rows[0]['gflops'] == pytest.approx(2 * OPENCLIP_GMACS[arch], rel=0.005)


def test_closed_form_by_component_vit_b32():
    """The by-hand figures of docs/method.md section 3, in GMACs."""
    parts = flops.closed_form(flops.base_config('ViT-B-32'))
    by_hand = {'MLPs': 2.831, 'patch embedding': 0.116, 'qkv + out projections': 1.416, 'attention matmuls': 0.046}
    for name, value in by_hand.items():
        assert parts[name] / 1e9 == pytest.approx(value, abs=0.0005), name
    assert sum(parts.values()) / 1e9 == pytest.approx(4.41, rel=0.005)


def test_counts_fall_as_the_ratio_grows(table):
    _, rows, base = table
    dtp = rows[1:]
    assert [r['tokens'] for r in dtp] == [1 + math.floor(base.n_patches / r + 0.5) for r in RATIOS]
    gmacs = [r['gmacs'] for r in dtp]
    assert all(a > b for a, b in zip(gmacs, gmacs[1:])), gmacs
    assert rows[0]['gmacs'] > gmacs[1]  # 2x already beats the plain ViT despite the predictor


def test_ratio_one_is_plain_plus_predictor_and_pooling(table):
    """At ratio 1 every patch is its own segment, so the only extra MACs are the predictor's two
    linear layers on the N patch tokens, N (D h + h) with h = D, and the pooling einsum, N x N x D
    (the identity pooling still multiplies an N x N weight matrix with the tokens)."""
    _, rows, base = table
    N, D = base.n_patches, base.width
    assert rows[1]['ratio'] == 1 and rows[1]['tokens'] == rows[0]['tokens']
    extra = N * (D * D + D) + N * N * D
    assert rows[1]['macs'] - rows[0]['macs'] == extra
    assert rows[1]['overhead_gmacs'] == pytest.approx(extra / 1e9)


def test_attention_is_counted_and_the_trap_is_real():
    base = flops.base_config('ViT-B-32')
    tower, images = DTPViT(base), torch.zeros(1, 3, 224, 224)
    counted = flops.fvcore_count(tower, images)
    uncounted = flops.fvcore_count(tower, images, attention=False)
    # fvcore's own behaviour: the fused attention op is silently skipped...
    assert 'aten::scaled_dot_product_attention' in uncounted.unsupported_ops()
    # ...and our handle adds exactly q k^T and attn v: 2 L^2 D per layer, 12 layers, L = 50
    assert counted.total() - uncounted.total() == 12 * 2 * 50 * 50 * 768
    assert uncounted.total() / 1e9 == pytest.approx(4.36, abs=0.005)


def test_an_uncounted_attention_op_is_an_error(monkeypatch):
    tiny = DTPViT(DTPConfig(image_size=32, patch_size=8, width=32, heads=2, pre_layers=1, short_layers=1,
                            embed_dim=16, boundary='none'))
    monkeypatch.setattr(flops, 'ATTENTION_OPS', ('aten::some_other_attention',))
    with pytest.raises(RuntimeError, match='scaled_dot_product_attention'):
        flops.fvcore_count(tiny, torch.zeros(1, 3, 32, 32))


def test_predictor_stays_in_the_traced_graph():
    """Passing boundaries makes the predicted ones dead code, which the JIT tracer deletes; the
    count must still include the predictor's linear layers."""
    cfg = DTPConfig(image_size=32, patch_size=8, width=32, heads=2, pre_layers=1, short_layers=1, embed_dim=16)
    analysis = flops.fvcore_count(DTPViT(cfg), torch.zeros(1, 3, 32, 32), fixed_boundaries(1, 16, 4))
    assert analysis.by_module()['tower.predictor'] == 16 * (32 * 32 + 32)


def test_json_cli():
    out = subprocess.run([sys.executable, 'flops.py', '--json', '--ratio', '4'], cwd=Path(__file__).parent,
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert [(r['arch'], r['pooling'], r['ratio'], r['tokens']) for r in rows] == [
        ('ViT-B-32', 'none', 1.0, 50), ('ViT-B-32', 'dtp', 4.0, 13)]  # 1 + round(49 / 4)
    assert all({'gmacs', 'params'} <= r.keys() for r in rows)
    assert rows[0]['gmacs'] == pytest.approx(4.41, rel=0.005) and rows[1]['gmacs'] < rows[0]['gmacs']


def write_images(folder, n, size=40):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = folder / f'class{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f'{i}.png')


TINY = dict(image_size=32, patch_size=8, width=32, heads=2, pre_layers=1, short_layers=2, embed_dim=16,
            boundary='gumbel', compression=4.0, eval_boundaries='threshold')


@pytest.mark.parametrize('kind', ['model_args', 'config'])
def test_checkpoint_flops_on_real_images(tmp_path, kind):
    """A checkpoint of a tiny model with data-dependent (thresholded) boundaries, as train_clip.py writes
    it (model_args) or as a bare {'model', 'config'} with wrapper prefixes: the per-image figure is the
    closed form at each image's segment count, the padded one with attention and pooling at its
    batch's largest (the blocks pack the real tokens), and fvcore agrees on one padded batch."""
    torch.manual_seed(0)
    model_args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1), **TINY)
    clip = load_openclip(**model_args)
    with torch.no_grad():  # logits around 0, so that the segment counts differ between images
        clip.visual.predictor[-1].bias.zero_()
        clip.visual.predictor[-1].weight.mul_(20)
    if kind == 'model_args':
        ckpt = dict(model=clip.state_dict(), model_args=model_args, config=dict(model='ViT-B-32', lr=1e-3), step=3)
    else:
        ckpt = dict(model={'_orig_mod.' + k: v for k, v in clip.state_dict().items()}, config={**TINY, 'lr': 1e-3})
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 6)

    rows = flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val'),
                       '--batch-size', '4', '--json'])
    plain, ideal, padded = rows
    assert (plain['pooling'], ideal['pooling'], padded['pooling']) == ('none', 'dtp', 'dtp')
    cfg = clip.visual.cfg
    assert plain['gmacs'] == pytest.approx(flops.gmacs(dataclasses.replace(cfg, boundary='none')))

    # the same two batches by hand: the loader's weights, sorted paths, the eval transform
    loaded, _ = flops.load_tower(str(tmp_path / 'ckpt.pt'), 'ignored')
    assert loaded.cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), clip.visual.state_dict().values()))
    transform = open_clip.image_transform(32, is_train=False)
    paths = sorted((tmp_path / 'val').rglob('*.png'))
    batches = [torch.stack([transform(Image.open(p)) for p in chunk]) for chunk in (paths[:4], paths[4:])]
    per_image, per_padded = [], []
    with torch.no_grad():
        for x in batches:
            counts = loaded.eval()(x)[1]['n_segments'].tolist()
            per_image += [flops.gmacs(cfg, s) for s in counts]
            per_padded += [flops.padded_gmacs(cfg, s, max(counts)) for s in counts]
        b = loaded(batches[0])[1]['boundaries']
    counts = b.sum(1).long().tolist()
    assert min(counts) < max(counts), counts  # the batch really is ragged, so padding is exercised
    assert ideal['gmacs'] == pytest.approx(sum(per_image) / 6) and padded['gmacs'] == pytest.approx(sum(per_padded) / 6)
    assert padded['gmacs'] > ideal['gmacs']
    # fvcore on that padded batch (packed blocks, masked attention) = what padded_gmacs says it runs
    total = flops.fvcore_count(loaded, batches[0], b).total()
    assert total == pytest.approx(1e9 * sum(flops.padded_gmacs(cfg, s, max(counts)) for s in counts), rel=0.005)


def test_checkpoint_with_extent_embeddings_compares_to_the_plain_vit(tmp_path):
    """A colour-router checkpoint with extent embeddings: its plain-ViT row is the same ViT without DTP's
    own weights (no extent embeddings: the parameter count drops by theirs), and the extent embeddings
    add no MACs to the pooled rows."""
    model_args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1),
                      **{**TINY, 'boundary': 'color', 'extent_embedding': True})
    clip = load_openclip(**model_args)
    torch.save(dict(model=clip.state_dict(), model_args=model_args, config=dict(model='ViT-B-32'), step=1),
               tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 4)
    plain, ideal, padded = flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val'),
                                       '--json'])
    cfg = clip.visual.cfg
    extent = sum(p.numel() for p in clip.visual.extent_embedding.parameters())
    assert extent == 2 * cfg.n_patches * cfg.width
    assert plain['params'] == ideal['params'] - extent
    assert plain['gmacs'] == pytest.approx(flops.gmacs(dataclasses.replace(cfg, boundary='none', extent_embedding=False)))
    assert ideal['gmacs'] == pytest.approx(flops.gmacs(cfg)) == pytest.approx(padded['gmacs'])



def test_checkpoint_of_the_color_prior_router_compares_to_the_plain_vit(tmp_path):
    """A learned router with a colour prior (its gain a weight of the predictor): flops.py reads the
    checkpoint, and its plain-ViT row drops the predictor, gain included."""
    model_args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1),
                      **{**TINY, 'boundary': 'gumbel', 'train_boundaries': 'reinforce', 'color_prior': 4.0})
    clip = load_openclip(**model_args)
    torch.save(dict(model=clip.state_dict(), model_args=model_args, config=dict(model='ViT-B-32'), step=1),
               tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 4)
    plain, ideal, _ = flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val'), '--json'])
    assert plain['params'] == ideal['params'] - sum(p.numel() for p in clip.visual.predictor.parameters())
    assert plain['gmacs'] == pytest.approx(flops.gmacs(flops.plain_config(clip.visual.cfg)))

def test_checkpoint_skips_and_counts_unreadable_images(tmp_path, capsys):
    model_args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1),
                      **{**TINY, 'boundary': 'fixed'})
    torch.save(dict(model=load_openclip(**model_args).state_dict(), model_args=model_args, step=1), tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 3)
    (tmp_path / 'val' / 'broken.jpg').write_bytes(b'not a jpeg')
    plain, ideal, padded = flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val'),
                                       '--json'])
    assert ideal['images'] == 3 and ideal['unreadable'] == 1 and 'broken.jpg' in capsys.readouterr().err


def test_a_tome_runs_checkpoint_is_refused(tmp_path):
    """Its weights are the plain ViT's: counted as DTP it would be reported at the plain ViT's cost."""
    model_args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1),
                      **{**TINY, 'boundary': 'none'})
    torch.save(dict(model=load_openclip(**model_args).state_dict(), model_args=model_args, step=1,
                    config=dict(tome_r=2, tome_cost=0.0)), tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 2)
    with pytest.raises(SystemExit, match=r"ToMe run's \(tome_r=2.*--tome-r"):
        flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val')])


def test_openclip_format_checkpoint(tmp_path):
    clip = load_openclip('ViT-S-32', image_size=64)
    torch.save(clip.state_dict(), tmp_path / 'openclip.pt')
    write_images(tmp_path / 'val', 3, size=64)
    args = ['--checkpoint', str(tmp_path / 'openclip.pt'), '--data', str(tmp_path / 'val'), '--model', 'ViT-S-32',
            '--image-size', '64', '--json']
    with pytest.raises(SystemExit):  # the compression it was trained at must be given
        flops.main(args)
    plain, ideal, padded = flops.main(args + ['--ratio', '2'])
    assert ideal['tokens'] == padded['tokens'] == 1 + 2  # top-k: round(4 / 2) segments for every image
    assert ideal['gmacs'] < plain['gmacs']


def test_bench_smoke():
    threads = torch.get_num_threads()
    try:  # one thread: two threads on a shared machine pay an OpenMP wake-up for every small op
        rows = flops.main(['--model', 'ViT-S-32', '--image-size', '64', '--ratio', '2', '--bench', '--batch-size', '2',
                           '--repeats', '1', '--threads', '1', '--json'])
    finally:
        torch.set_num_threads(threads)
    assert [r['pooling'] for r in rows] == ['none', 'dtp']
    weights = sum(p.numel() for p in DTPViT(flops.base_config('ViT-S-32', 64)).parameters()) * 4 / 1e9
    for row in rows:
        assert row['throughput'] > 0 and row['train_step_s'] > 0 and row['ideal'] > 0
        assert row['peak_mem_gb'] > weights
    assert rows[1]['bench_tokens'] == 1 + 2 and rows[1]['ideal'] > 1


@pytest.mark.parametrize('train_boundaries', ['bernoulli', 'topk'])
def test_bench_trains_with_the_samples_asked_for(train_boundaries):
    """--train-boundaries topk times training steps on exactly round(N / r) segments per image (no host
    read-back of the count); bernoulli, the default, on the paper's samples, whose counts vary."""
    threads = torch.get_num_threads()
    try:
        rows = flops.main(['--model', 'ViT-S-32', '--image-size', '96', '--ratio', '3', '--bench', '--batch-size', '4',
                           '--repeats', '1', '--threads', '1', '--json', '--train-boundaries', train_boundaries])
    finally:
        torch.set_num_threads(threads)
    assert rows[1]['mode'].endswith(f'({train_boundaries})')
    if train_boundaries == 'topk':  # 9 patches at 3x: 3 segments for every image, every step
        assert rows[1]['train_tokens'] == rows[1]['bench_tokens'] == 1 + 3


def test_scan_order_leaves_the_flops_unchanged():
    """Hilbert order permutes the patches before segmentation: same segments per image, same count."""
    base = dataclasses.replace(flops.base_config('ViT-B-32'), boundary='gumbel', compression=4.0)
    images, b = torch.zeros(1, 3, 224, 224), fixed_boundaries(1, 49, 13)
    counts = [flops.fvcore_count(DTPViT(dataclasses.replace(base, scan=scan)), images, b).total()
              for scan in ('raster', 'hilbert')]
    assert counts[0] == counts[1] == pytest.approx(1e9 * flops.gmacs(base, 13), rel=0.005)


@pytest.mark.parametrize('boundary, extent', [('cosine', False), ('fixed', False), ('color', False), ('fixed', True)])
def test_weightless_routers_are_counted_by_the_closed_form(boundary, extent):
    """The cosine and colour routers, fixed pooling and the extent embeddings (a gather and an add) add
    no counted work beyond the pooling: fvcore's count of what runs equals the closed form at
    round(49 / 4) = 12 segments, on ViT-B-32 shapes."""
    cfg = dataclasses.replace(flops.base_config('ViT-B-32'), boundary=boundary, compression=4.0,
                              extent_embedding=extent)
    count = flops.fvcore_count(DTPViT(cfg).eval(), torch.randn(1, 3, 224, 224)).total()
    assert count == pytest.approx(1e9 * flops.gmacs(cfg), rel=1e-6) and cfg.n_segments == 12

def test_a_predictor_reading_pairs_is_counted_by_the_closed_form():
    """predictor_pairs doubles the predictor's first layer (it reads 2 D features per patch): fvcore's count
    of the ViT-B-32 tower equals the closed form, N (2 D h + h) for the predictor, and the plain ViT of that
    config drops it with the rest of the predictor."""
    cfg = dataclasses.replace(flops.base_config('ViT-B-32'), boundary='gumbel', compression=4.0, predictor_pairs=True)
    count = flops.fvcore_count(DTPViT(cfg).eval(), torch.randn(1, 3, 224, 224)).total()
    assert count == pytest.approx(1e9 * flops.gmacs(cfg), rel=1e-6)
    assert flops.closed_form(cfg)['boundary predictor'] == 49 * (2 * 768 * 768 + 768)
    assert DTPViT(flops.plain_config(cfg))  # a valid config: no predictor to read pairs


def test_checkpoint_reports_segment_quality_on_shapes_val(tmp_path):
    root = data.make_shapes(tmp_path / 'shapes', n_train=8, n_val=12, image_size=32, shard_size=8, workers=1)['root']
    clip = load_openclip(model_name='ViT-B-32', text=dict(width=32, heads=2, layers=1), **TINY)
    torch.save(dict(model=clip.state_dict(), model_args=dict(model_name='ViT-B-32', pretrained=None,
                                                           text=dict(width=32, heads=2, layers=1), **TINY)),
               tmp_path / 'ckpt.pt')
    _, dtp, _ = flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', f'{root}/val', '--json'])
    assert 0 <= dtp['segment_purity'] <= 1 and 0 < dtp['object_tokens'] <= 1
    assert dtp['boundary_prob_std'] >= 0 and 'boundary_margin' in dtp


@pytest.mark.parametrize('args, message', [
    (['--ratio', '0'], "'0' is not a compression ratio"),
    (['--ratio', '4', '-2'], "'-2' is not a compression ratio"),
    (['--model', 'RN50'], 'RN50 is not a plain OpenCLIP ViT'),
    (['--model', 'ViT-B-23'], "unknown OpenCLIP model 'ViT-B-23'"),
    (['--checkpoint', 'README.md', '--data', '.'], 'README.md is not a readable checkpoint'),
    (['--tome-r', '-1'], "'-1' is not a ToMe r"),
    (['--tome-cost', '2'], "'2' is not a relative cost"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    proc = subprocess.run([sys.executable, 'flops.py', *args], cwd=Path(__file__).parent, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


# ToMe (tome.py) on the plain ViT

@pytest.mark.parametrize('r', [8, [0, 4, 8, 2, 0, 30, 1, 1, 1, 1, 1, 1]])
def test_tome_fvcore_equals_closed_form(r):
    """fvcore's count of the patched ViT-B-32 tower agrees with tome_closed_form, and the matching's
    similarity matmuls are in it: the only matmuls besides the final projection."""
    base = flops.base_config('ViT-B-32')
    analysis = flops.fvcore_count(tome.patch(DTPViT(base), r), torch.zeros(1, 3, 224, 224))
    parts = flops.tome_closed_form(base, r)
    assert analysis.total() == pytest.approx(sum(parts.values()), rel=0.005)
    assert analysis.by_operator()['matmul'] == parts['matching'] + parts['projection'] and parts['matching'] > 0
    zero = flops.tome_closed_form(base, 0)  # r = 0: the plain ViT's count
    assert zero['matching'] == 0 and sum(zero.values()) == sum(flops.closed_form(base).values())


def test_tome_r_for_cost_matches_dtp():
    """The schedules chosen for DTP's 2x and 4x costs on ViT-B-32 land within 1% of them; the constant
    r is the nearest constant, and the cost falls as r grows."""
    base = flops.base_config('ViT-B-32')
    plain = flops.gmacs(base)
    costs = [flops.tome_gmacs(base, r) for r in range(26)]
    assert all(a >= b for a, b in zip(costs, costs[1:])) and costs[0] == pytest.approx(plain)
    for ratio in (2, 4):
        target = flops.gmacs(dataclasses.replace(base, boundary='gumbel', compression=ratio)) / plain
        r = flops.tome_r_for_cost(base, target)
        assert isinstance(r, int) and abs(costs[r] / plain - target) == min(abs(c / plain - target) for c in costs)
        schedule = flops.tome_r_for_cost(base, target, per_block=True)
        assert flops.tome_gmacs(base, schedule) / plain == pytest.approx(target, abs=0.01)


def test_tome_rows_in_the_cli():
    rows = flops.main(['--ratio', '4', '--tome-r', '8', '--tome-cost', '0.42', '--json'])
    assert [r['pooling'] for r in rows] == ['none', 'dtp', 'tome', 'tome']
    base = flops.base_config('ViT-B-32')
    for row, r in zip(rows[2:], [8, flops.tome_r_for_cost(base, 0.42, per_block=True)]):
        assert row['tome_r'] == r and row['gmacs'] == pytest.approx(flops.tome_gmacs(base, r), rel=0.005)
        assert row['tokens'] == row['tokens_per_block'][-1] - min(r if isinstance(r, int) else r[-1],
                                                                  (row['tokens_per_block'][-1] - 1) // 2)
    assert rows[3]['rel_cost'] == pytest.approx(0.42, abs=0.01)


def test_bench_smoke_with_tome():
    """--bench times ToMe beside the plain ViT and DTP (ViT-S-32 at 64 px: 4 patches + [CLS], r = 1:
    5 -> 4 -> 3 -> 2 tokens, then no more merges)."""
    threads = torch.get_num_threads()
    try:
        rows = flops.main(['--model', 'ViT-S-32', '--image-size', '64', '--ratio', '2', '--tome-r', '1', '--bench',
                           '--batch-size', '2', '--repeats', '1', '--threads', '1', '--json'])
    finally:
        torch.set_num_threads(threads)
    assert [r['pooling'] for r in rows] == ['none', 'dtp', 'tome']
    plain, _, merged = rows
    base = flops.base_config('ViT-S-32', 64)
    assert merged['tome_r'] == 1 and merged['bench_tokens'] == merged['tokens'] == 2
    assert merged['ideal'] == pytest.approx(flops.gmacs(base) / flops.tome_gmacs(base, 1))
    assert merged['throughput'] > 0 and merged['train_step_s'] > 0 and merged['peak_mem_gb'] > 0
    assert merged['params'] == plain['params'] and merged['train_tokens'] == 2
