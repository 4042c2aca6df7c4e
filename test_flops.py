"""Tests of flops.py: fvcore's count against the closed form, the published ViT baselines, the
attention trap, the CLI, --checkpoint --data, and a tiny --bench smoke test."""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import data
import flops
import routers
import tome
from conftest import run_script
from model import DTPConfig, DTPViT, fixed_boundaries, is_new, load_openclip

RATIOS = [1, 2, 4, 10]
# OpenCLIP's docs/model_profile.csv, image tower, 2 FLOPs per MAC (docs/method.md section 3)
OPENCLIP_GMACS = {'ViT-B-32': 8.82 / 2, 'ViT-B-16': 35.13 / 2}


@pytest.fixture(scope='module', params=['ViT-B-32', 'ViT-B-16'])
def table(request):
    rows, base, _ = flops.flop_rows(request.param, RATIOS)
    return request.param, rows, base


def test_fvcore_equals_closed_form(table):
    """To the multiply-add: both count the same matmuls of the same shapes."""
    _, rows, base = table
    assert [r['pooling'] for r in rows] == ['none'] + ['dtp'] * len(RATIOS)
    N = base.n_patches
    for row in rows:
        cfg, S = base, None
        if row['pooling'] == 'dtp':
            cfg = dataclasses.replace(base, boundary='gumbel', compression=row['ratio'])
            S = cfg.n_segments
        closed = sum(flops.closed_form(cfg, S).values())
        assert row['macs'] == closed, row


@pytest.mark.parametrize('boundary, ratio', [('none', 1), ('gumbel', 2), ('gumbel', 4), ('fixed', 4), ('gumbel', 10),
                                             ('router', 4), ('router', 10)])
def test_torchs_own_flop_counter_agrees_with_flops_py_to_the_mac(boundary, ratio):
    """A second oracle, maintained with torch rather than by fvcore (whose torch.jit tracing this torch
    deprecates): torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add) on ViT-B-32 with evenly
    spaced boundaries, against flops.py's closed form and fvcore's count, exactly. Attention runs on the math
    backend here: FlopCounterMode counts its two matmuls there, but on the CPU's fused kernel
    (_scaled_dot_product_flash_attention_for_cpu) it counts nothing, fvcore's trap (docs/method.md) again."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    base = flops.base_config('ViT-B-32')
    geometry = {f.name: getattr(base, f.name) for f in dataclasses.fields(DTPConfig)
                if f.name not in ('boundary', 'compression', 'eval_boundaries')}
    if boundary == 'router':
        tower = routers.RouterViT(routers.RouterConfig(**geometry, boundary='router', compression=ratio))
    else:
        tower = DTPViT(DTPConfig(**geometry, boundary=boundary, compression=ratio))
    cfg, images = tower.eval().cfg, torch.zeros(1, 3, 224, 224)
    given = None if boundary == 'none' else fixed_boundaries(1, cfg.n_patches, cfg.n_segments)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        tower(images, given)
    torch_macs = counter.get_total_flops() // 2
    assert torch_macs == sum(flops.closed_form(cfg).values()) == flops.fvcore_count(tower, images, given).total()
    counted = {str(op) for op in counter.get_flop_counts()['Global']}
    assert 'aten.bmm' in counted  # the attention matmuls (and the pooling einsum) are in the count


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


# Multiply-adds written out by hand, an oracle that shares no code with flops.py, for the geometries the CLI tests
# use. A block of width D at L tokens: the qkv projection L x D x 3D, the output projection L x D x D, q k^T and
# attn v 2 x A x A x D (A: the tokens attention runs on, L unless padded to a batch's largest count), the MLP's
# two linear layers 2 x M x D x 4D (M: the tokens reaching it, L unless ToMe merged some after attention).
def block_by_hand(D, L, attended=None, mlp_tokens=None):
    A = L if attended is None else attended
    M = L if mlp_tokens is None else mlp_tokens
    return L * D * 3 * D + L * D * D + 2 * A * A * D + 2 * M * D * 4 * D


def tiny_by_hand(segments=None, padded_to=None, short_layers=2, predictor=16 * (32 * 32 + 32), embed_dim=16):
    """TINY's geometry (and config/shapes_tiny.py's with short_layers=1, embed_dim=32): 32 px images of 8 px
    patches, N = 16 patches + [CLS], width 32, 1 + short_layers blocks. The patch embedding is a (3 x 8 x 8) -> 32
    map per patch; the projection 32 -> embed_dim. segments=None: the plain ViT, every block at 17 tokens.
    Otherwise the pre-block at 17 tokens, the predictor (default: Linear(32, 32) and Linear(32, 1) on each
    patch), the pooling einsum (segments x 16 patches x 32), the shortened blocks at 1 + segments (attention,
    and the pooling, at 1 + padded_to where a batch is padded)."""
    patch_embedding, projection = 16 * (3 * 8 * 8) * 32, 32 * embed_dim
    if segments is None:
        return patch_embedding + (1 + short_layers) * block_by_hand(32, 17) + projection
    P = segments if padded_to is None else padded_to
    return (patch_embedding + block_by_hand(32, 17) + predictor + P * 16 * 32
            + short_layers * block_by_hand(32, 1 + segments, attended=1 + P) + projection)


# ViT-S-32 at 64 px (the --bench tests): 2 x 2 = 4 patches of 32 px + [CLS], width 384, 12 blocks, 6 heads,
# embed_dim 384; the patch embedding 4 x (3 x 32 x 32) x 384, the projection 384 x 384.
S32_EDGES = 4 * (3 * 32 * 32) * 384 + 384 * 384
S32_PLAIN = S32_EDGES + 12 * block_by_hand(384, 5)
# DTP at ratio 2 (pre_layers 2): 2 blocks at 5 tokens, the predictor (Linear(384, 384) + Linear(384, 1) on 4
# patches), the pooling einsum (2 segments x 4 patches x 384), 10 blocks at 1 + round(4 / 2) = 3 tokens
S32_DTP2 = S32_EDGES + 2 * block_by_hand(384, 5) + 4 * (384 * 384 + 384) + 2 * 4 * 384 + 10 * block_by_hand(384, 3)
# ToMe r = 1 on all 12 blocks: 5 -> 4 -> 3 -> 2 tokens, then (2 - 1) // 2 = 0 merges; a merging block's MLP
# runs on the tokens left, and its matching multiplies ceil(L / 2) x floor(L / 2) key pairs of 384 / 6 = 64
S32_TOME1 = (S32_EDGES + block_by_hand(384, 5, mlp_tokens=4) + block_by_hand(384, 4, mlp_tokens=3)
             + block_by_hand(384, 3, mlp_tokens=2) + 9 * block_by_hand(384, 2) + (3 * 2 + 2 * 2 + 2 * 1) * 64)


def test_the_by_hand_counts_are_fvcores():
    """The hand-written counts against fvcore's count of the real towers (a second, independent oracle), and
    against the totals worked out on paper: the CLI tests below compare flops.py's numbers with them."""
    assert (tiny_by_hand(), tiny_by_hand(4), tiny_by_hand(3, padded_to=5)) == (780_992, 471_232, 448_576)
    assert (S32_PLAIN, S32_DTP2, S32_TOME1) == (111_264_768, 76_346_880, 54_478_080)
    tiny = DTPConfig(**{**TINY, 'eval_boundaries': 'topk'})
    images = torch.zeros(1, 3, 32, 32)
    assert flops.fvcore_count(DTPViT(dataclasses.replace(tiny, boundary='none')), images).total() == tiny_by_hand()
    for s in (1, 4, 16):
        assert flops.fvcore_count(DTPViT(tiny), images, fixed_boundaries(1, 16, s)).total() == tiny_by_hand(s)
    s32 = flops.base_config('ViT-S-32', 64)
    images = torch.zeros(1, 3, 64, 64)
    assert flops.fvcore_count(DTPViT(s32), images).total() == S32_PLAIN
    assert flops.fvcore_count(tome.patch(DTPViT(s32), 1), images).total() == S32_TOME1
    dtp = DTPViT(dataclasses.replace(s32, boundary='gumbel', compression=2.0))
    assert flops.fvcore_count(dtp, images, fixed_boundaries(1, 4, 2)).total() == S32_DTP2


# kind -> the OpenCLIP architecture the checkpoint names (None: it names none), and the one load_tower reports
CHECKPOINT_KINDS = {'model_args': ('ViT-S-32', 'ViT-S-32'), 'model_args without a name': (None, 'ViT-B-32'),
                    'config': (None, 'custom'), 'config with model': ('ViT-B-32-quickgelu', 'ViT-B-32-quickgelu')}


@pytest.mark.parametrize('kind', list(CHECKPOINT_KINDS))
def test_checkpoint_flops_on_real_images(tmp_path, kind):
    """A checkpoint of a tiny model with data-dependent (thresholded) boundaries, as train_clip.py writes
    it (model_args, its model_name given or left to load_openclip's default) or as a bare {'model', 'config'}
    with wrapper prefixes (its tower settings partly under 'vision', its architecture named by 'model' or not at
    all): the tower is the checkpoint's, QuickGELU of a '-quickgelu' architecture included; the architecture
    reported is the one the checkpoint names ('custom' when a bare config names none); the per-image figure is the
    closed form at each image's segment count, the padded one with attention and pooling at its
    batch's largest (the blocks pack the real tokens), both counted here by hand (tiny_by_hand), and fvcore agrees
    on one padded batch."""
    torch.manual_seed(0)
    # architectures other than the default ViT-B-32 where one is named, so that a name read from the wrong place
    # shows (ViT-B-32-quickgelu: the only difference from DTPConfig's defaults that TINY leaves is the activation)
    name = CHECKPOINT_KINDS[kind][0]
    model_args = dict(pretrained=None, text=dict(width=32, heads=2, layers=1), **TINY)
    if name:
        model_args['model_name'] = name
    clip = load_openclip(**model_args)
    with torch.no_grad():  # logits around 0, so that the segment counts differ between images
        clip.visual.predictor[-1].bias.zero_()
        clip.visual.predictor[-1].weight.mul_(20)
    if kind.startswith('model_args'):
        ckpt = dict(model=clip.state_dict(), model_args=model_args, config=dict(model='ViT-L-14', lr=1e-3), step=3)
    else:
        # the keys of a compiled model under DDP: both wrappers' prefixes, stripped in turn; the width and the
        # depth under 'vision' (overrides of an OpenCLIP config), the rest under their own names
        vision = {k: TINY[k] for k in ('width', 'short_layers')}
        config = {**{k: v for k, v in TINY.items() if k not in vision}, 'vision': vision, 'lr': 1e-3}
        if name:
            config['model'] = name
        ckpt = dict(model={'module._orig_mod.' + k: v for k, v in clip.state_dict().items()}, config=config)
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 6)

    rows = flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val'),
                       '--batch-size', '4', '--json'])
    plain, ideal, padded = rows
    assert (plain['pooling'], ideal['pooling'], padded['pooling']) == ('none', 'dtp', 'dtp')
    cfg = clip.visual.cfg
    assert plain['gmacs'] == tiny_by_hand() / 1e9

    # the same two batches by hand: the loader's weights, sorted paths, the eval transform
    loaded, arch = flops.load_tower(str(tmp_path / 'ckpt.pt'), 'ignored')
    assert arch == plain['arch'] == CHECKPOINT_KINDS[kind][1]
    assert loaded.cfg == cfg and cfg.quick_gelu == (kind == 'config with model')
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), clip.visual.state_dict().values()))
    transform = open_clip.image_transform(32, is_train=False)
    paths = sorted((tmp_path / 'val').rglob('*.png'))
    batches = [torch.stack([transform(Image.open(p)) for p in chunk]) for chunk in (paths[:4], paths[4:])]
    per_image, per_padded = [], []
    with torch.no_grad():
        for x in batches:
            counts = loaded.eval()(x)[1]['n_segments'].tolist()
            per_image += [tiny_by_hand(s) for s in counts]
            per_padded += [tiny_by_hand(s, padded_to=max(counts)) for s in counts]
        b = loaded(batches[0])[1]['boundaries']
    counts = b.sum(1).long().tolist()
    assert min(counts) < max(counts), counts  # the batch really is ragged, so padding is exercised
    assert ideal['gmacs'] == pytest.approx(sum(per_image) / 6 / 1e9, rel=1e-12)
    assert padded['gmacs'] == pytest.approx(sum(per_padded) / 6 / 1e9, rel=1e-12)
    assert padded['gmacs'] > ideal['gmacs']
    # fvcore on that padded batch (packed blocks, masked attention) = the count by hand, to the multiply-add
    assert flops.fvcore_count(loaded, batches[0], b).total() == sum(tiny_by_hand(s, max(counts)) for s in counts)


@pytest.fixture(scope='module')
def router_run(tmp_path_factory):
    """The checkpoint of a 2-step train_clip.py run with routers.py's learned router (its defaults: min_segment 2,
    a colour gain, extent embeddings) on config/shapes_tiny.py: 32 px, 8 px patches, width 32, 1 + 1 blocks."""
    out = tmp_path_factory.mktemp('router') / 'run'
    run_script('train_clip.py', 'config/shapes_tiny.py', f'--out_dir={out}', '--boundary=router', '--max_steps=2')
    return str(out / 'ckpt.pt')


def flops_cli(*args):
    return subprocess.run([sys.executable, 'flops.py', *args], cwd=Path(__file__).parent, capture_output=True,
                          text=True)


def test_a_router_runs_checkpoint_compares_to_the_plain_vit(router_run):
    """python flops.py --checkpoint on a boundary='router' run (it used to crash building the plain ViT's config
    when min_segment > 1): its plain-ViT row is the ViT of that geometry with boundary='none', built here by hand,
    and its parameters are the checkpoint's less the router's own (predictor, colour gain included, and extent
    embeddings); every image gets its round(16 / 4) = 4 segments."""
    proc = flops_cli('--checkpoint', router_run, '--data', data.shapes_paths()['val'], '--json')
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, ideal, padded = json.loads(proc.stdout)
    by_hand = DTPConfig(image_size=32, patch_size=8, width=32, heads=2, embed_dim=32, pre_layers=1, short_layers=1,
                        boundary='none')
    vit = DTPViT(by_hand)
    assert plain['pooling'] == 'none' and plain['gmacs'] == flops.gmacs(by_hand)
    assert plain['gmacs'] * 1e9 == flops.fvcore_count(vit, torch.zeros(1, 3, 32, 32)).total()
    weights = {k[len('visual.'):]: v for k, v in torch.load(router_run, weights_only=True)['model'].items()
               if k.startswith('visual.')}
    own = {k: v.numel() for k, v in weights.items() if k.startswith(('predictor.', 'extent_embedding.'))}
    assert 'predictor.color_gain' in own and {'extent_embedding.start', 'extent_embedding.end'} <= set(own)
    assert plain['params'] == sum(p.numel() for p in vit.parameters()) == ideal['params'] - sum(own.values())
    assert ideal['params'] == sum(v.numel() for v in weights.values())
    assert ideal['images'] == 1500 and ideal['tokens'] == padded['tokens'] == 1 + 4
    assert ideal['gmacs'] == padded['gmacs'] < plain['gmacs']
    # by hand: 1 + 1 blocks, embed_dim 32, the router's Linear(2 x 32, 32) + Linear(32, 1) on the 16 patches
    assert plain['gmacs'] * 1e9 == pytest.approx(tiny_by_hand(short_layers=1, embed_dim=32), rel=1e-12)
    assert ideal['gmacs'] * 1e9 == pytest.approx(
        tiny_by_hand(4, short_layers=1, embed_dim=32, predictor=16 * (2 * 32 * 32 + 32)), rel=1e-12)


def test_a_router_checkpoint_with_threshold_counts_costs_the_mean_of_its_images(router_run):
    """--eval-boundaries threshold on a router run: the threshold is calibrated on the --data images to the target
    mean count (4 segments of 16 patches), the images' counts differ, and the ideal MMACs are the mean of each
    image's own (its count's closed form), which the padded batches exceed."""
    proc = flops_cli('--checkpoint', router_run, '--data', data.shapes_paths()['val'], '--json',
                     '--eval-boundaries', 'threshold')
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, ideal, padded = json.loads(proc.stdout)
    assert ideal['eval_boundaries'] == 'threshold' and ideal['ratio'] == pytest.approx(4.0, abs=0.01)
    tower = flops.load_tower(router_run, 'ViT-B-32')[0].eval()
    tower.cfg.eval_boundaries = 'threshold'
    transform = open_clip.image_transform(32, is_train=False)
    paths = sorted(Path(data.shapes_paths()['val']).rglob('*.jpg'))
    images = torch.stack([transform(data.load_image(p)) for p in paths])
    tower.calibrate([images])
    with torch.no_grad():
        counts = tower(images)[1]['n_segments'].tolist()
    assert min(counts) < max(counts)
    assert ideal['gmacs'] == pytest.approx(sum(flops.gmacs(tower.cfg, c) for c in counts) / len(counts), rel=1e-9)
    assert padded['gmacs'] > ideal['gmacs']


def test_checkpoint_batch_size_must_be_positive(router_run):
    """--batch-size 0 used to be taken for "not given" (32) silently; it is refused naming it."""
    proc = flops_cli('--batch-size', '0', '--checkpoint', router_run, '--data', data.shapes_paths()['val'])
    assert proc.returncode != 0 and '--batch-size 0: must be >= 1' in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and not proc.stdout


def test_checkpoint_of_a_weightless_rule_compares_to_the_plain_vit(tmp_path):
    """routers.py's colour rule has no weights: the plain-ViT row has all its parameters, and the pooled rows
    cost the closed form at round(16 / 4) = 4 segments, nothing more."""
    model_args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1),
                      **{**TINY, 'boundary': 'color', 'eval_boundaries': 'topk'})
    clip = load_openclip(**model_args, tower=routers.RouterViT)
    torch.save(dict(model=clip.state_dict(), model_args=model_args, config=dict(arch='ViT-B-32'), step=1),
               tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 4)
    plain, ideal, padded = flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val'),
                                       '--json'])
    cfg = clip.visual.cfg
    assert isinstance(cfg, routers.RouterConfig) and cfg.boundary == 'color'
    assert plain['params'] == ideal['params'] == sum(p.numel() for p in clip.visual.parameters())
    assert plain['gmacs'] == tiny_by_hand() / 1e9
    assert ideal['gmacs'] == padded['gmacs'] == pytest.approx(tiny_by_hand(4, predictor=0) / 1e9, rel=1e-12)
    assert ideal['tokens'] == 1 + 4


def test_checkpoint_skips_and_counts_unreadable_images(tmp_path, capsys):
    model_args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1),
                      **{**TINY, 'boundary': 'fixed', 'eval_boundaries': 'topk'})
    torch.save(dict(model=load_openclip(**model_args).state_dict(), model_args=model_args, step=1), tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 3)
    (tmp_path / 'val' / 'broken.jpg').write_bytes(b'not a jpeg')
    plain, ideal, padded = flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val'),
                                       '--json'])
    assert ideal['images'] == 3 and ideal['unreadable'] == 1 and 'broken.jpg' in capsys.readouterr().err


@pytest.mark.parametrize('tome_r, tome_cost', [(2, 0.0), (0, 0.5)])
def test_a_tome_runs_checkpoint_is_refused(tmp_path, tome_r, tome_cost):
    """Its weights are the plain ViT's: counted as DTP it would be reported at the plain ViT's cost."""
    model_args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1),
                      **{**TINY, 'boundary': 'none', 'eval_boundaries': 'topk'})
    torch.save(dict(model=load_openclip(**model_args).state_dict(), model_args=model_args, step=1,
                    config=dict(tome_r=tome_r, tome_cost=tome_cost)), tmp_path / 'ckpt.pt')
    write_images(tmp_path / 'val', 2)
    with pytest.raises(SystemExit, match=rf"ToMe run's \(tome_r={tome_r}, tome_cost={tome_cost}\).*--tome-r"):
        flops.main(['--checkpoint', str(tmp_path / 'ckpt.pt'), '--data', str(tmp_path / 'val')])


def test_openclip_format_checkpoint(tmp_path):
    clip = load_openclip('ViT-S-32', image_size=64)
    torch.save(clip.state_dict(), tmp_path / 'openclip.pt')
    write_images(tmp_path / 'val', 3, size=64)
    args = ['--checkpoint', str(tmp_path / 'openclip.pt'), '--data', str(tmp_path / 'val'), '--model', 'ViT-S-32',
            '--image-size', '64', '--json']
    with pytest.raises(SystemExit, match=r'openclip.pt is an OpenCLIP-format checkpoint: pass the compression it '
                                         r'was trained at as a single --ratio R \(and --model, --pre-layers'):
        flops.main(args)
    plain, ideal, padded = flops.main(args + ['--ratio', '2'])
    assert ideal['tokens'] == padded['tokens'] == 1 + 2  # top-k: round(4 / 2) segments for every image
    assert ideal['gmacs'] < plain['gmacs'] and plain['arch'] == 'ViT-S-32'
    # the file's weights (every one the plain tower has), with the settings from the command line
    tower, arch = flops.load_tower(str(tmp_path / 'openclip.pt'), 'ViT-S-32', ratio=2, pre_layers=1, image_size=64)
    assert arch == 'ViT-S-32' and tower.cfg.image_size == 64 and tower.cfg.compression == 2
    assert tower.cfg.pre_layers == 1 != clip.visual.cfg.pre_layers and tower.cfg.boundary == 'gumbel'
    saved = clip.visual.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in tower.state_dict().items() if not is_new(k))


def test_bench_smoke():
    """--bench on ViT-S-32 at 64 px (4 patches + [CLS]) at ratio 2, checked where it can be derived: the tokens
    inference ran (N + 1 = 5 for the plain ViT, 1 + round(4 / 2) = 3 for DTP), their cost (the closed form, the
    FLOP table's fvcore count and the count by hand), ideal and the speedups from the rows' own numbers, the
    predictor's parameters by hand, and the segments of training's Bernoulli samples (see below)."""
    threads = torch.get_num_threads()
    try:  # one thread: two threads on a shared machine pay an OpenMP wake-up for every small op
        rows = flops.main(['--model', 'ViT-S-32', '--image-size', '64', '--ratio', '2', '--bench', '--batch-size', '32',
                           '--repeats', '1', '--threads', '1', '--json'])
    finally:
        torch.set_num_threads(threads)
    assert [(r['arch'], r['pooling'], r['ratio'], r['tokens'], r['bench_tokens']) for r in rows] == [
        ('ViT-S-32', 'none', 1.0, 5, 5), ('ViT-S-32', 'dtp', 2.0, 3, 3)]
    assert all((r['device'], r['batch_size'], r['repeats']) == ('cpu', 32, 1) for r in rows)
    plain, dtp = rows
    base = flops.base_config('ViT-S-32', 64)
    assert plain['bench_gmacs'] == flops.gmacs(base)
    assert dtp['bench_gmacs'] == flops.gmacs(dataclasses.replace(base, boundary='gumbel', compression=2.0), 2)
    for row, by_hand in zip(rows, (S32_PLAIN, S32_DTP2)):
        assert row['macs'] == by_hand and row['bench_gmacs'] == pytest.approx(by_hand / 1e9, rel=1e-12)
    assert plain['ideal'] == 1.0 and dtp['ideal'] == plain['bench_gmacs'] / dtp['bench_gmacs']
    assert dtp['ideal'] == pytest.approx(S32_PLAIN / S32_DTP2, rel=1e-12)
    for row in rows:
        assert row['speedup'] == row['throughput'] / plain['throughput']
        assert row['train_speedup'] == plain['train_step_s'] / row['train_step_s']
        assert row['throughput'] > 0 and row['train_step_s'] > 0
    assert plain['speedup'] == plain['train_speedup'] == 1.0
    # the same plain weights in both rows; DTP adds its predictor: LayerNorm(384), Linear(384, 384), Linear(384, 1)
    assert plain['params'] == sum(p.numel() for p in DTPViT(base).parameters())
    assert dtp['params'] - plain['params'] == 2 * 384 + (384 * 384 + 384) + (384 + 1)
    weights = plain['params'] * 4 / 1e9
    assert plain['peak_mem_gb'] > weights and dtp['peak_mem_gb'] > weights
    # Training: the plain ViT keeps its 4 patches. DTP's train tokens are 1 + the mean segment count of 3 steps (2
    # while measuring memory, 1 timed) of 32 images, so 96 x (train_tokens - 1) is a whole number. The untrained
    # predictor starts at the rate p = (4 / 2 - 1) / (4 - 1) = 1/3 on the 3 patches before the last (a boundary by
    # construction): each image has 1 + Binomial(3, 1/3) segments, mean 2, standard deviation sqrt(2/3). The range
    # is 4.5 standard deviations of a mean over 96 images, loose on purpose: the draws are random (the test fixes
    # no seed), and the predictor's random last layer scatters each patch's logit around the initial bias (here
    # by ~0.2, a mean rate of ~0.32). A sampler at 1/r = 1/2 (mean 2.5) lies outside it; the top-k eval cuts
    # (exactly 2) would not, so this checks the rate the samples are drawn at.
    assert plain['train_tokens'] == 5.0
    segments = dtp['train_tokens'] - 1
    assert abs(96 * segments - round(96 * segments)) < 1e-9, segments
    assert abs(segments - 2) <= 4.5 * math.sqrt(2 / 3 / 96), segments


def router_config(base, **settings):
    """routers.RouterConfig with the geometry of the plain config base."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DTPConfig)}
    return routers.RouterConfig(**{**fields, 'boundary': 'router', 'compression': 4.0, **settings})


@pytest.mark.parametrize('boundary, settings', [
    ('fixed', {}), ('cosine', {}), ('cosine', dict(size_attention=True)), ('color', {}),
], ids=['fixed', 'cosine', 'cosine_size_attention', 'color'])
def test_weightless_rules_are_counted_by_the_closed_form(boundary, settings):
    """Fixed pooling and routers.py's cosine and colour rules (and size-aware attention, a bias on the logits) add no
    counted work beyond the pooling: fvcore's count of what runs equals the closed form at round(49 / 4) = 12
    segments, on ViT-B-32 shapes, to the multiply-add."""
    base = flops.base_config('ViT-B-32')
    if boundary == 'fixed':
        cfg, tower = dataclasses.replace(base, boundary='fixed', compression=4.0), DTPViT
    else:
        cfg, tower = router_config(base, boundary=boundary, **settings), routers.RouterViT
    count = flops.fvcore_count(tower(cfg).eval(), torch.randn(1, 3, 224, 224)).total()
    assert count == sum(flops.closed_form(cfg).values()) and cfg.n_segments == 12
    assert flops.closed_form(cfg)['boundary predictor'] == 0


def test_the_routers_predictor_is_counted_by_the_closed_form():
    """routers.py's learned router reads each patch and its change to the next (2 D features): fvcore counts its
    predictor at N (2 D h + h) on ViT-B-32 (h = D), as the closed form does, and the whole tower to the multiply-add;
    its plain ViT (flops.plain_config) is model.py's DTPConfig of the same geometry, without the predictor."""
    base = flops.base_config('ViT-B-32')
    cfg = router_config(base)
    analysis = flops.fvcore_count(routers.RouterViT(cfg).eval(), torch.randn(1, 3, 224, 224))
    assert analysis.by_module()['tower.predictor'] == flops.closed_form(cfg)['boundary predictor'] == (
        49 * (2 * 768 * 768 + 768))
    assert analysis.total() == sum(flops.closed_form(cfg).values())
    plain = flops.plain_config(cfg)
    assert type(plain) is DTPConfig and plain == base
    assert not hasattr(DTPViT(plain), 'predictor')


def test_tome_r_for_cost_refuses_a_cost_below_the_cheapest_schedule():
    """Below the cost of every block halving its tokens no schedule exists: a ValueError naming that cheapest
    cost (it used to return the cheapest schedule silently); the cheapest cost itself is that schedule."""
    base = flops.base_config('ViT-B-32')
    cheapest = flops.tome_gmacs(base, 1000) / flops.gmacs(base)  # 1000 saturates: (L - 1) // 2 in every block
    with pytest.raises(ValueError, match=rf'between {cheapest:.3f} \(every block halving the tokens\) and 1'):
        flops.tome_r_for_cost(base, cheapest - 0.01)
    with pytest.raises(ValueError):
        flops.tome_r_for_cost(base, 1.01)
    r = flops.tome_r_for_cost(base, cheapest)
    assert tome.applied(50, r, 12) == tome.applied(50, 1000, 12)
    assert flops.tome_r_for_cost(base, 1.0) == 0


# Object masks of five shapes val images, drawn on their 4 x 4 grid of 8 px patches: '#' a patch all shape, '=' its
# top half (50% >= 1/3: an object patch), ':' its top quarter (25% < 1/3: background), '.' background.
QUALITY_MASKS = [
    ['====', '....', '....', '....'],  # row 0 is object
    ['....', '.##.', '.##.', '....'],  # the centre 2 x 2
    ['....', '..:.', '....', '....'],  # no object patch
    ['#...', '#...', '....', '....'],  # the first two of column 0
    ['....', '....', '....', '..:#'],  # the last patch
]
ROWS_COVERED = {'#': 8, '=': 4, ':': 2, '.': 0}


def object_patches_by_hand(index):
    """The 16 object patches (row-major) of QUALITY_MASKS[index]."""
    return [ROWS_COVERED[c] * 3 >= 8 for row in QUALITY_MASKS[index] for c in row]  # covered share >= 1/3


def write_quality_masks(root):
    """Replace the val_masks.npy of a 5-image shapes val set by QUALITY_MASKS, in pixels (255: shape)."""
    masks = np.zeros((len(QUALITY_MASKS), 32, 32), np.uint8)
    for i, grid in enumerate(QUALITY_MASKS):
        for r, row in enumerate(grid):
            for c, char in enumerate(row):
                masks[i, 8 * r:8 * r + ROWS_COVERED[char], 8 * c:8 * (c + 1)] = 255
    np.save(Path(root) / 'val_masks.npy', masks)


def quality_by_hand(segments_of):
    """segment_purity and object_tokens of QUALITY_MASKS, given segments_of(i): image i's segments as lists of
    patch indices: the share of segments all object or all background; per image with an object, the segments
    touching it per object patch, averaged."""
    pure = count = 0
    per_object = []
    for i in range(len(QUALITY_MASKS)):
        objects = object_patches_by_hand(i)
        segments = segments_of(i)
        assert sorted(t for seg in segments for t in seg) == list(range(16))
        pure += sum(len({objects[t] for t in seg}) == 1 for seg in segments)
        count += len(segments)
        if any(objects):
            per_object.append(sum(any(objects[t] for t in seg) for seg in segments) / sum(objects))
    return pure / count, sum(per_object) / len(per_object)


def test_checkpoint_reports_segment_quality_on_shapes_val(tmp_path):
    """--checkpoint --data on shapes val images whose object masks are known (QUALITY_MASKS): with fixed pooling at
    4x every image's segments are the 4 rows of its grid, so segment_purity is (4 + 2 + 4 + 2 + 3) / 20 pure rows
    and object_tokens (1/4 + 2/4 + 2/2 + 1/1) / 4 (the third image has no object patch: its quarter-covered patch
    is under the 1/3 threshold); a transposed (column-major) mask would give 12 / 20 and 3 / 4. With a learned
    predictor (thresholded, so the segments differ between images and each must meet its own mask), the same
    figures and the predictor's boundary_prob_std and boundary_margin, recomputed here from its logits."""
    root = data.make_shapes(tmp_path / 'shapes', n_train=8, n_val=5, image_size=32, shard_size=8, workers=1)['root']
    write_quality_masks(root)
    text = dict(width=32, heads=2, layers=1)
    fixed = dict(model_name='ViT-B-32', pretrained=None, text=text,
                 **{**TINY, 'boundary': 'fixed', 'eval_boundaries': 'topk'})
    torch.save(dict(model=load_openclip(**fixed).state_dict(), model_args=fixed), tmp_path / 'fixed.pt')
    _, dtp, _ = flops.main(['--checkpoint', str(tmp_path / 'fixed.pt'), '--data', f'{root}/val', '--json'])
    rows = quality_by_hand(lambda i: [[4 * r + c for c in range(4)] for r in range(4)])
    assert rows == (15 / 20, (1 / 4 + 2 / 4 + 2 / 2 + 1 / 1) / 4)
    assert (dtp['segment_purity'], dtp['object_tokens']) == rows
    assert 'boundary_prob_std' not in dtp and 'boundary_margin' not in dtp  # no predictor

    torch.manual_seed(0)
    learned = dict(model_name='ViT-B-32', pretrained=None, text=text, **TINY)
    clip = load_openclip(**learned)
    with torch.no_grad():  # logits around 0, so that the segments differ between images
        clip.visual.predictor[-1].bias.zero_()
        clip.visual.predictor[-1].weight.mul_(20)
    torch.save(dict(model=clip.state_dict(), model_args=learned), tmp_path / 'learned.pt')
    _, dtp, _ = flops.main(['--checkpoint', str(tmp_path / 'learned.pt'), '--data', f'{root}/val', '--json'])
    paths = sorted(Path(root, 'val').rglob('*.jpg'), key=lambda p: int(p.stem))  # image i: mask i
    transform = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        aux = clip.visual.eval()(torch.stack([transform(Image.open(p).convert('RGB')) for p in paths]))[1]
    cuts = aux['boundaries'].tolist()  # 1: the patch closes its segment
    assert len({tuple(c) for c in cuts}) > 1, cuts  # the pairing of images with masks matters

    def segments_of(i):
        segments, current = [], []
        for t in range(16):
            current.append(t)
            if cuts[i][t] or t == 15:
                segments.append(current)
                current = []
        return segments
    purity, object_tokens = quality_by_hand(segments_of)
    assert dtp['segment_purity'] == pytest.approx(purity, rel=1e-12)
    assert dtp['object_tokens'] == pytest.approx(object_tokens, rel=1e-6)  # summed in float32
    stds, margins = [], []
    for logits, cut in zip(aux['boundary_logits'].tolist(), cuts):
        p = [1 / (1 + math.exp(-x)) for x in logits[:15]]  # the last patch, a boundary by construction, left out
        mean = sum(p) / 15
        stds.append(math.sqrt(sum((q - mean) ** 2 for q in p) / 15))
        chosen = [q for q, c in zip(p, cut) if c]
        rest = [q for q, c in zip(p, cut) if not c]
        if chosen and rest:
            margins.append(sum(chosen) / len(chosen) - sum(rest) / len(rest))
    assert margins and dtp['boundary_prob_std'] == pytest.approx(sum(stds) / 5, rel=1e-5)
    assert dtp['boundary_margin'] == pytest.approx(sum(margins) / len(margins), rel=1e-5)


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
    assert analysis.total() == sum(parts.values())  # to the multiply-add
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


def test_tome_r_for_cost_per_block_is_the_nearest_front_loaded_schedule():
    """per_block=True against a search of every schedule of its family (a + 1 tokens in the first k blocks, a in
    the rest, for every a and k): the schedule it returns misses each target by the least any of them does, and a
    constant schedule comes back as an int. Two towers, costs from the cheapest to 1."""
    for base in (flops.base_config('ViT-B-32'), DTPConfig(image_size=48, patch_size=8, width=128, heads=4,
                                                         embed_dim=128, pre_layers=2, short_layers=4, boundary='none')):
        plain, depth = flops.gmacs(base), base.pre_layers + base.short_layers
        family = [[a + 1] * k + [a] * (depth - k) for a in range(base.n_patches // 2 + 1) for k in range(depth)]
        costs = [flops.tome_gmacs(base, r) / plain for r in family]
        cheapest = flops.tome_gmacs(base, base.n_patches // 2) / plain
        for target in [cheapest + (1 - cheapest) * i / 40 for i in range(41)]:
            schedule = flops.tome_r_for_cost(base, target, per_block=True)
            assert abs(flops.tome_gmacs(base, schedule) / plain - target) == min(abs(c - target) for c in costs)
            if isinstance(schedule, list):
                assert len(set(schedule)) == 2
            else:
                assert isinstance(schedule, int)
        assert flops.tome_r_for_cost(base, 1.0, per_block=True) == 0


def documented_block(path, marker):
    """The lines of the one ``` block of a document (path from the repository root) that holds marker."""
    blocks = (Path(__file__).parent / path).read_text().split('```')[1::2]
    [block] = [b for b in blocks if marker in b]
    return block.strip().splitlines()


def test_the_printed_tables_are_the_documented_ones(capsys):
    """The FLOP table flops.py prints (print_table, format_r's short ToMe schedules), as README.md and
    docs/speed.md show it: every line of their blocks is a line the command prints today, to the character, so
    a changed count, schedule or layout shows here and the documents cannot go stale unseen."""
    for args, path, marker in [(['--ratio', '4'], 'README.md', 'ViT-B-32  dtp      4'),
                               (['--tome-r', '8', '--tome-cost', '0.6', '0.42'], 'docs/speed.md', 'tome     r=8 ')]:
        flops.main(args)
        printed = capsys.readouterr().out.splitlines()
        documented = documented_block(path, marker)
        assert len(documented) >= 3 and [line for line in documented if line not in printed] == [], args


def test_format_r_writes_a_schedule_as_its_runs():
    """format_r by hand: a constant r as itself, a schedule as runs of equal values in block order."""
    assert flops.format_r(8) == 'r=8'
    assert flops.format_r([4] * 2 + [3] * 10) == 'r=[4]*2+[3]*10'
    assert flops.format_r([6, 5]) == 'r=[6]*1+[5]*1'
    assert flops.format_r([3, 1, 1, 3]) == 'r=[3]*1+[1]*2+[3]*1'  # runs, not counts of each value


def test_tome_rows_in_the_cli():
    """A ToMe row's gmacs is fvcore's count of the patched tower (flops.tome_rows), so equality with tome_gmacs is
    two counts agreeing; its token counts are checked against a schedule worked out by hand."""
    rows = flops.main(['--ratio', '4', '--tome-r', '8', '--tome-cost', '0.42', '--json'])
    assert [r['pooling'] for r in rows] == ['none', 'dtp', 'tome', 'tome']
    base = flops.base_config('ViT-B-32')
    for row, r in zip(rows[2:], [8, flops.tome_r_for_cost(base, 0.42, per_block=True)]):
        assert row['tome_r'] == r and row['gmacs'] == flops.tome_gmacs(base, r)
        assert row['tokens'] == row['tokens_per_block'][-1] - min(r if isinstance(r, int) else r[-1],
                                                                  (row['tokens_per_block'][-1] - 1) // 2)
    assert rows[3]['rel_cost'] == pytest.approx(0.42, abs=0.01)
    # r = 8 on ViT-B-32's 50 tokens, by hand: 8 merges a block while (L - 1) // 2 allows, then (L - 1) // 2
    assert rows[2]['tokens_per_block'] == [50, 42, 34, 26, 18, 10, 6, 4, 3, 2, 2, 2] and rows[2]['tokens'] == 2


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
    assert merged['bench_gmacs'] == flops.tome_gmacs(base, 1) and merged['macs'] == S32_TOME1  # fvcore, by hand
    assert merged['ideal'] == pytest.approx(flops.gmacs(base) / flops.tome_gmacs(base, 1))
    assert merged['ideal'] == pytest.approx(S32_PLAIN / S32_TOME1, rel=1e-12)
    assert merged['speedup'] == merged['throughput'] / plain['throughput']
    assert merged['throughput'] > 0 and merged['train_step_s'] > 0 and merged['peak_mem_gb'] > 0
    assert merged['params'] == plain['params'] and merged['train_tokens'] == 2
