"""Tests of model.py. Real ViT-B-32 shapes where a test is about ViT-B-32, tiny configs elsewhere."""
import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model as M
from model import CLIP, DTPConfig, DTPViT, load_openclip
from train_utils import distortion_cost, reinforce_loss

TEXT_TINY = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)


def tiny(**kw):
    """A small DTP-ViT: 64 patches of 4x4 pixels, width 32."""
    return DTPConfig(**{**dict(image_size=32, patch_size=4, width=32, heads=2, pre_layers=1, short_layers=2,
                               embed_dim=16, predictor_hidden=32), **kw})


@pytest.fixture(scope='module')
def openclip_b32(tmp_path_factory):
    """A randomly initialised OpenCLIP ViT-B-32, every weight perturbed (so a LayerNorm bias left at
    zero or a scale left at one cannot hide a mapping mistake), saved in three checkpoint formats."""
    torch.manual_seed(0)
    ref = open_clip.create_model('ViT-B-32').eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = tmp_path_factory.mktemp('ckpt')
    state_dict = ref.state_dict()
    torch.save(state_dict, d / 'raw.pt')
    torch.save({'state_dict': {'module.' + k: v for k, v in state_dict.items()}, 'epoch': 3}, d / 'ddp.pt')
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(d / 'model.safetensors'))
    images = torch.randn(3, 3, 224, 224)
    texts = open_clip.get_tokenizer('ViT-B-32')(['a dog', 'a small red circle in the top left corner', ''])
    with torch.no_grad():
        expected = ref.encode_image(images), ref.encode_text(texts)
    return d, images, texts, expected


# 1. equivalence with OpenCLIP ----------------------------------------------------------------

@pytest.mark.parametrize('fmt', ['raw.pt', 'ddp.pt', 'model.safetensors'])
def test_plain_vit_reproduces_openclip(openclip_b32, fmt):
    d, images, texts, (ref_image, ref_text) = openclip_b32
    model = load_openclip('ViT-B-32', str(d / fmt), boundary='none').eval()
    assert model.visual.cfg.heads == 12 and len(model.visual.transformer.resblocks) == 12
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(texts)
    assert (image - ref_image).abs().max() <= 1e-5
    assert (text - ref_text).abs().max() <= 1e-5
    assert ref_image.abs().max() > 1  # the comparison is not between two near-zero tensors


def test_gumbel_with_every_patch_a_boundary_reproduces_openclip(openclip_b32):
    d, images, texts, (ref_image, _) = openclip_b32
    # the extent embeddings are DTP's own weights, as the predictor: zero until trained, so no change
    model = load_openclip('ViT-B-32', str(d / 'raw.pt'), boundary='gumbel', compression=4,
                          extent_embedding=True).eval()
    assert not model.visual.extent_embedding['start'].any()
    with torch.no_grad():
        forced, aux = model.visual(images, boundaries=torch.ones(3, 49))
        # compression 1 asks for one segment per patch from the predictor's own top-k
        model.visual.cfg.compression = 1.0
        topk, aux1 = model.visual(images)
    assert aux['n_segments'].tolist() == [49] * 3 and aux1['n_segments'].tolist() == [49] * 3
    assert (forced - ref_image).abs().max() <= 1e-5
    assert (topk - ref_image).abs().max() <= 1e-5


def test_loader_maps_every_weight_and_names_what_is_wrong(openclip_b32, tmp_path):
    d, *_ = openclip_b32
    state_dict = torch.load(d / 'raw.pt', weights_only=True)
    model = load_openclip('ViT-B-32', str(d / 'raw.pt'), pre_layers=3)
    ours = model.state_dict()
    for k, v in state_dict.items():  # every checkpoint weight landed, bit for bit
        k = k if k.startswith('visual.') or k == 'logit_scale' else 'text.' + k
        assert torch.equal(ours[k], v), k
    assert model.visual.cfg.pre_layers == 3 and model.visual.cfg.short_layers == 9

    missing = {k: v for k, v in state_dict.items() if k != 'visual.ln_pre.bias'}
    torch.save(missing, tmp_path / 'missing.pt')
    with pytest.raises(KeyError, match=r'visual\.ln_pre\.bias'):
        load_openclip('ViT-B-32', str(tmp_path / 'missing.pt'))
    torch.save({**state_dict, 'visual.extra_token': torch.zeros(3)}, tmp_path / 'extra.pt')
    with pytest.raises(KeyError, match=r'visual\.extra_token'):
        load_openclip('ViT-B-32', str(tmp_path / 'extra.pt'))
    with pytest.raises(ValueError, match=r'must equal the depth'):
        load_openclip('ViT-B-32', str(d / 'raw.pt'), pre_layers=2, short_layers=8)
    small = load_openclip('ViT-B-32', pre_layers=1, short_layers=2, width=64, heads=2,
                          text=dict(width=32, heads=2, layers=1, context_length=16))  # no weights: any depth
    assert len(small.visual.transformer.resblocks) == 3 and small.text.context_length == 16
    with pytest.raises(TypeError, match=r"compresion.*compression"):
        load_openclip('ViT-B-32', compresion=4)
    with pytest.raises(ValueError, match=r"unknown text_cfg key 'contxt_length'.*context_length"):
        load_openclip('ViT-B-32', text=dict(contxt_length=16))
    with pytest.raises(ValueError, match=r'ViT-B-32'):
        load_openclip('ViT-B-23')
    with pytest.raises(FileNotFoundError, match=r'neither a file nor an OpenCLIP tag'):
        load_openclip('ViT-B-32', 'no_such_tag_or_file')


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript_archive(state_dict, path):
    """A TorchScript archive whose state dict is `state_dict`, as OpenAI's released CLIP files are (their
    code is a traced CLIP; only the state dict is ever read)."""
    root = _Holder()
    for key, value in state_dict.items():
        module, (*parents, leaf) = root, key.split('.')
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value)
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope='module')
def openai_b32(tmp_path_factory):
    """OpenAI-format ViT-B-32 weights made here: a perturbed random QuickGELU CLIP, its linear and conv
    weights in fp16 as in OpenAI's release, plus the release's three extra entries; saved as a TorchScript
    archive (what pretrained='openai' downloads) and as a plain state dict."""
    torch.manual_seed(1)
    ref = open_clip.create_model('ViT-B-32-quickgelu')
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    open_clip.model.convert_weights_to_fp16(ref)
    state_dict = dict(ref.state_dict(), input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                      vocab_size=torch.tensor(49408))
    d = tmp_path_factory.mktemp('openai')
    save_torchscript_archive(state_dict, d / 'ViT-B-32.pt')
    torch.save(state_dict, d / 'state_dict.pt')
    return d


@pytest.mark.parametrize('fmt', ['ViT-B-32.pt', 'state_dict.pt'])
def test_openai_weights_reproduce_openclip(openai_b32, fmt):
    path = str(openai_b32 / fmt)
    ref = open_clip.load_openai_model(path, device='cpu').eval()  # OpenCLIP's own loader of these files
    model = load_openclip('ViT-B-32', path, boundary='none').eval()
    assert model.visual.cfg.quick_gelu  # as OpenAI trained them, though 'ViT-B-32' says GELU
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    texts = open_clip.get_tokenizer('ViT-B-32')(['a dog', 'a small red circle'])
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-5
        assert (model.encode_text(texts) - ref.encode_text(texts)).abs().max() <= 1e-5
        assert ref.encode_image(images).abs().max() > 1


@pytest.mark.parametrize('content', [b'', b'PK\x03\x04 truncated', bytes(range(256)) * 4, b'not a checkpoint\n'])
def test_unreadable_checkpoint_names_the_file(tmp_path, content, openclip_b32):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{bad} is not a readable checkpoint"):
        load_openclip('ViT-B-32', str(bad))
    truncated = tmp_path / 'truncated.pt'  # a real checkpoint cut short, as by a full disk
    truncated.write_bytes((openclip_b32[0] / 'raw.pt').read_bytes()[:100000])
    with pytest.raises(ValueError, match=rf"{truncated} is not a readable checkpoint"):
        load_openclip('ViT-B-32', str(truncated))


def test_own_training_checkpoint_loads_as_pretrained(tmp_path):
    """A train_clip.py ckpt.pt given as pretrained: its weights load into a model with its settings
    (here 1 + 1 blocks of an OpenCLIP ViT-B-32, not the config's 12); other settings are told what to do."""
    args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1, context_length=16),
                image_size=32, patch_size=8, width=32, heads=2, embed_dim=16, pre_layers=1, short_layers=1)
    torch.manual_seed(0)
    trained = load_openclip(**args)
    path = tmp_path / 'ckpt.pt'
    torch.save(dict(model=trained.state_dict(), optimizer={}, step=3, config={}, model_args=args), path)
    loaded = load_openclip(**{**args, 'pretrained': str(path)})
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    plain = load_openclip(**{**args, 'pretrained': str(path), 'boundary': 'none'})  # drops the predictor
    assert torch.equal(plain.visual.proj, trained.visual.proj)
    with pytest.raises(KeyError, match=r"shapes.*visual\.conv1\.weight.*init_from='resume'") as e:
        load_openclip(**{**args, 'pretrained': str(path), 'width': 64})
    assert len(str(e.value)) < 2000  # a few names, not every key of the model
    with pytest.raises(ValueError, match=r'depth of the checkpoint .*ckpt\.pt \(2 blocks\)'):
        load_openclip(**{**args, 'pretrained': str(path), 'short_layers': 3})


def test_pretrained_tag_offline_asks_for_a_local_file(monkeypatch):
    def offline(cfg, **kw):
        raise FileNotFoundError('Name or service not known')
    monkeypatch.setattr(open_clip, 'download_pretrained', offline)
    with pytest.raises(RuntimeError, match=r'pass the local file.*load_openclip'):
        load_openclip('ViT-B-32', 'laion2b_s34b_b79k')


def test_openclip_configs_map_to_the_right_architecture():
    b16 = load_openclip('ViT-B-16')
    assert (b16.visual.cfg.heads, b16.visual.cfg.patch_size, b16.visual.cfg.n_patches) == (12, 16, 196)
    s32 = load_openclip('ViT-S-32', compression=10)
    assert (s32.visual.cfg.width, s32.visual.cfg.heads, s32.visual.cfg.embed_dim) == (384, 6, 384)
    quick = load_openclip('ViT-B-32-quickgelu')
    assert quick.visual.cfg.quick_gelu
    assert isinstance(quick.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert isinstance(quick.text.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


# 2. the task loss reaches the predictor ---------------------------------------------------------

def test_task_loss_alone_reaches_every_predictor_parameter():
    torch.manual_seed(0)
    vit = DTPViT(tiny(compression=4)).train()
    features, aux = vit(torch.randn(4, 3, 32, 32))
    features.square().sum().backward()  # no boundary loss in this loss
    for name, p in vit.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# 3. batch invariance --------------------------------------------------------------------------

@pytest.mark.parametrize('pool', ['cls', 'mean'])
@pytest.mark.parametrize('eval_boundaries', ['threshold', 'topk'])
def test_features_do_not_depend_on_the_rest_of_the_batch(pool, eval_boundaries):
    torch.manual_seed(0)
    cfg = DTPConfig(pool=pool, eval_boundaries=eval_boundaries, compression=4)  # ViT-B-32 shapes
    vit = DTPViT(cfg).eval()
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()  # thresholds near 0.5: segment counts differ from image to image
        images = torch.randn(5, 3, 224, 224)
        batch, aux = vit(images)
        alone = torch.cat([vit(images[i:i + 1])[0] for i in range(5)])
    if eval_boundaries == 'threshold':  # the property under test needs padding in the batch
        assert len(set(aux['n_segments'].tolist())) > 1, aux['n_segments']
    assert (batch - alone).abs().max() <= 1e-5


def test_the_demo_routers_evaluation_is_deterministic_and_batch_invariant():
    """config/shapes_router4x.py's router at ViT-B-32 shapes (min_segment=2, colour prior, pair-reading
    predictor, extent embeddings): the cuts evaluation takes, one after another, depend on each image alone."""
    torch.manual_seed(0)
    vit = DTPViT(DTPConfig(compression=4, train_boundaries='reinforce', reinforce_baseline='greedy',
                           train_on_greedy=True, min_segment=2, color_prior=4.0, predictor_pairs=True,
                           extent_embedding=True)).eval()
    with torch.no_grad():
        vit.predictor[-1].weight.normal_()  # REINFORCE's last layer starts at zero: give the logits content
        images = torch.randn(5, 3, 224, 224)
        batch, aux = vit(images)
        again = vit(images)[0]
        alone = torch.cat([vit(images[i:i + 1])[0] for i in range(5)])
    assert torch.equal(batch, again) and (batch - alone).abs().max() <= 1e-5
    assert aux['segment_sizes'].min() >= 2 and aux['n_segments'].eq(12).all()  # 49 patches at 4x


# 4. deterministic evaluation --------------------------------------------------------------------

@pytest.mark.parametrize('eval_boundaries', ['threshold', 'topk'])
def test_eval_is_deterministic_and_train_is_sampled(eval_boundaries):
    torch.manual_seed(0)
    vit = DTPViT(tiny(eval_boundaries=eval_boundaries))
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()
    images = torch.randn(4, 3, 32, 32)
    vit.eval()
    (f1, a1), (f2, a2) = vit(images), vit(images)
    assert torch.equal(f1, f2) and torch.equal(a1['boundaries'], a2['boundaries'])
    vit.train()
    assert not torch.equal(vit(images)[1]['boundaries'], vit(images)[1]['boundaries'])


@pytest.mark.parametrize('compression', [2.0, 4.0, 10.0])
def test_default_eval_compression_matches_training(compression):
    """A fresh predictor is uncertain: thresholding it at 0.5 keeps almost no boundaries, so the
    default eval rule must be the one that keeps eval-time compression near training's."""
    torch.manual_seed(0)
    vit = DTPViT(DTPConfig(compression=compression))  # ViT-B-32 shapes
    images = torch.randn(32, 3, 224, 224)
    with torch.no_grad():
        train = torch.stack([vit.train()(images)[1]['compression'] for _ in range(3)]).mean()
        default = vit.eval()(images)[1]['compression']
    assert abs(default / train - 1) <= 0.15, (train, default)
    assert abs(train / compression - 1) <= 0.1  # the predictor starts at the target rate


# 5. conservation -------------------------------------------------------------------------------

def test_every_patch_is_pooled_exactly_once():
    torch.manual_seed(0)
    B, N = 6, 49
    raw = (torch.rand(B, N) < 0.2).float()
    raw[0] = 0  # no boundary at all: one segment of everything
    raw[1, -1] = 0  # patches after the last boundary must form a segment, not be dropped
    raw[2] = 1  # one segment per patch
    b = torch.cat([raw[:, :-1], torch.ones(B, 1)], dim=1)  # what the model does
    x = torch.eye(N).expand(B, N, N)  # patch t is the unit vector e_t
    pooled, valid, sizes = M.pool_segments(x, b)
    n_segments = b.sum(1).long()
    counts = (pooled > 0).sum(-1)  # patches in each segment
    for i in range(B):
        S = n_segments[i]
        # segment s holds its patches with weight 1/count each: times the count, a 0/1 membership
        membership = pooled[i, :S] * counts[i, :S, None]
        assert torch.allclose(membership.sum(0), torch.ones(N))  # every patch in exactly one segment
        assert torch.allclose(membership, membership.round())
        assert (counts[i, :S] > 0).all() and (pooled[i, S:] == 0).all()  # padding is empty
        assert valid is None or valid[i].sum() == S
    assert n_segments[0] == 1 and n_segments[2] == N


def test_last_patch_always_closes_a_segment():
    torch.manual_seed(0)
    vit = DTPViT(tiny(compression=8))
    images = torch.randn(8, 3, 32, 32)
    for mode in ['train', 'eval']:
        getattr(vit, mode)()
        assert (vit(images)[1]['boundaries'][:, -1] == 1).all()
    _, aux = vit(images, boundaries=torch.zeros(8, 64))  # even when the caller forgets it
    assert aux['n_segments'].tolist() == [1] * 8


# 6. boundary prior -----------------------------------------------------------------------------

def test_boundary_loss_is_the_binomial_nll():
    b = (torch.rand(5, 49) < 0.3).float()
    for prior in [0.1, 0.25, 0.5]:
        k = b.sum(1)
        expected = -torch.distributions.Binomial(49, probs=torch.tensor(prior)).log_prob(k) / 49
        assert torch.allclose(M.boundary_prior_loss(b, prior), expected.mean(), atol=1e-6)


@pytest.mark.parametrize('compression', [4.0, 10.0])
def test_boundary_loss_alone_trains_the_rate_to_the_target(compression):
    torch.manual_seed(0)
    vit = DTPViT(tiny(image_size=64, compression=compression)).train()  # 256 patches
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()  # start far from the target: rate 0.5
    opt = torch.optim.Adam(vit.predictor.parameters(), lr=3e-3)
    rates = []
    for step in range(300):
        _, aux = vit(torch.randn(16, 3, 64, 64))
        opt.zero_grad()
        aux['boundary_loss'].backward()
        opt.step()
        rates.append(aux['boundaries'].mean().item())
    achieved, target = sum(rates[-50:]) / 50, 1 / compression
    print(f'compression {compression}: boundary rate {achieved:.4f}, target {target:.4f}')
    assert abs(achieved - target) <= 0.1 * target


# 7. fixed pooling and mixed precision ----------------------------------------------------------

@pytest.mark.parametrize('n', [49, 196, 64])
@pytest.mark.parametrize('compression', [1, 2, 3, 4, 10, 49])
def test_fixed_boundaries_give_ceil_n_over_r_even_segments(n, compression):
    S = min(n, math.ceil(n / compression))
    b = M.fixed_boundaries(2, n, S)
    assert (b.sum(1) == S).all() and b[0, -1] == 1
    ends = torch.nonzero(b[0]).flatten()
    sizes = torch.diff(ends, prepend=torch.tensor([-1]))
    assert sizes.max() - sizes.min() <= 1


def test_fixed_mode_in_the_model():
    vit = DTPViT(DTPConfig(boundary='fixed', compression=4)).eval()  # ViT-B-32: 49 patches
    with torch.no_grad():
        _, aux = vit(torch.randn(2, 3, 224, 224))
    assert aux['n_segments'].tolist() == [12, 12] and aux['boundary_loss'] == 0  # round(49 / 4)
    assert not hasattr(vit, 'predictor')


@pytest.mark.parametrize('compression', [2.0, 4.0, 3.0, 10.0])
def test_one_segment_count_for_fixed_pooling_topk_eval_topk_training_and_flops(compression):
    """At ratio r every path keeps N / r segments rounded half up (49 / 2 = 24.5 -> 25): the FLOP
    tables count what evaluation runs."""
    import flops
    images = torch.randn(2, 3, 224, 224)
    expected = math.floor(49 / compression + 0.5)
    counts = []
    for boundary, train_boundaries, mode in [('fixed', 'bernoulli', 'eval'), ('gumbel', 'bernoulli', 'eval'),
                                             ('gumbel', 'topk', 'train')]:
        vit = DTPViT(DTPConfig(boundary=boundary, train_boundaries=train_boundaries, compression=compression,
                               short_layers=1))
        with torch.no_grad():
            counts += getattr(vit, mode)()(images)[1]['n_segments'].tolist()
    assert counts == [expected] * 6
    cfg = DTPConfig(compression=compression)
    assert sum(flops.closed_form(cfg).values()) == sum(flops.closed_form(cfg, expected).values())


def test_topk_eval_gives_round_n_over_r_segments():
    vit = DTPViT(tiny(compression=3.0)).eval()
    with torch.no_grad():
        _, aux = vit(torch.randn(4, 3, 32, 32))
    assert aux['n_segments'].tolist() == [round(64 / 3)] * 4
    assert abs(aux['compression'] - 64 / 21) < 1e-5


@pytest.mark.parametrize('boundary, size_attention', [('gumbel', False), ('gumbel', True), ('cosine', True),
                                                      ('color', False)])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_mixed_precision_forward_backward_is_finite(dtype, boundary, size_attention):
    torch.manual_seed(0)
    vit = DTPViT(tiny(compression=4, boundary=boundary, size_attention=size_attention,
                      extent_embedding=True)).train()
    if boundary == 'gumbel':
        with torch.no_grad():  # a confident predictor: probabilities near 0 and 1, where fp16 broke
            vit.predictor[-1].weight.mul_(50)
    with torch.autocast('cpu', dtype=dtype):
        features, aux = vit(torch.randn(4, 3, 32, 32))
        loss = features.float().square().mean() + aux['boundary_loss']
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in vit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_its_predictor_in_float32(dtype):
    """A gumbel model cast with .half() / .to(torch.bfloat16) runs (train and eval, forward and backward), and
    its predictor still computes in float32: the logits are those of a float32 copy of it, bit for bit."""
    torch.manual_seed(0)
    vit = DTPViT(tiny()).to(dtype)
    inputs = []
    vit.predictor.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    images = torch.randn(4, 3, 32, 32).to(dtype)
    for train in (False, True):
        features, aux = vit.train(train)(images)
        assert features.dtype == dtype and torch.isfinite(features).all()
        assert inputs[-1].dtype == torch.float32
        with torch.no_grad():
            expected = copy.deepcopy(vit.predictor).float()(inputs[-1]).squeeze(-1)
        assert aux['boundary_logits'].dtype == torch.float32 and torch.equal(aux['boundary_logits'], expected)
    (features.float().square().mean() + aux['boundary_loss']).backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name


# CLIP wrapper ---------------------------------------------------------------------------------

def test_clip_forward_returns_what_a_training_step_needs():
    torch.manual_seed(0)
    model = CLIP(tiny(), TEXT_TINY).train()
    texts = open_clip.tokenize(['a red circle', 'a blue square'], context_length=16)
    out = model(torch.randn(2, 3, 32, 32), texts)
    assert set(out) >= {'image_features', 'text_features', 'logit_scale', 'boundary_loss', 'compression',
                        'n_segments', 'boundaries'}
    assert torch.allclose(out['image_features'].norm(dim=-1), torch.ones(2))
    assert torch.allclose(out['logit_scale'], torch.tensor(1 / 0.07))
    assert torch.allclose(model.encode_text(texts, normalize=True), out['text_features'])


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match='boundary'):
        DTPConfig(boundary='dynamic')
    with pytest.raises(ValueError, match='compression'):
        DTPConfig(compression=0.5)
    with pytest.raises(ValueError, match="extent_embedding.*boundary='none'"):
        DTPConfig(boundary='none', extent_embedding=True)


# 7. scan order ---------------------------------------------------------------------------------

def grid_steps(order, w):
    """City-block length of every step between consecutive cells of a row-major order."""
    return [abs(a // w - b // w) + abs(a % w - b % w) for a, b in zip(order, order[1:])]


@pytest.mark.parametrize('h, w', [(6, 6), (7, 7), (14, 14), (16, 16), (5, 7), (7, 5), (6, 10), (3, 8), (1, 5)])
def test_hilbert_order_is_a_path_through_neighbouring_patches(h, w):
    order = M.gilbert_order(h, w)
    assert sorted(order) == list(range(h * w))
    assert all(step == 1 for step in grid_steps(order, w))


@pytest.mark.parametrize('h, w', [(4, 5), (6, 7), (9, 4)])
def test_hilbert_order_takes_one_diagonal_step_where_parity_forces_it(h, w):
    # an odd long side and an even short side: one step is diagonal, never longer
    order = M.gilbert_order(h, w)
    steps = grid_steps(order, w)
    assert sorted(order) == list(range(h * w)) and steps.count(2) == 1 and set(steps) == {1, 2}
    diagonal = steps.index(2)
    a, b = order[diagonal], order[diagonal + 1]
    assert abs(a // w - b // w) == 1 and abs(a % w - b % w) == 1


def connected(cells, w):
    cells, todo = set(cells), [next(iter(cells))]
    seen = set(todo)
    while todo:
        c = todo.pop()
        for n in (c - w, c + w, c - 1 if c % w else None, c + 1 if (c + 1) % w else None):
            if n in cells and n not in seen:
                seen.add(n)
                todo.append(n)
    return seen == cells


@pytest.mark.parametrize('grid', [6, 7, 14, 16])
def test_fixed_segments_in_hilbert_order_are_connected_regions(grid):
    vit = DTPViT(DTPConfig(image_size=grid * 4, patch_size=4, width=32, heads=2, pre_layers=0, short_layers=1,
                           embed_dim=8, boundary='fixed', compression=4, scan='hilbert')).eval()
    with torch.no_grad():
        seg = vit(torch.randn(1, 3, grid * 4, grid * 4))[1]['segment_ids'][0]
    for s in seg.unique().tolist():
        assert connected((seg == s).nonzero().flatten().tolist(), grid), s
    if grid % 2:
        return  # segments of 3 and 4 patches: no 2x2 block structure to expect
    # most runs of 4 are 2x2 blocks (raster order has none on these grids)
    blocks = sum(1 for s in seg.unique().tolist()
                 if len(cells := (seg == s).nonzero().flatten().tolist()) == 4
                 and max(c // grid for c in cells) - min(c // grid for c in cells) == 1
                 and max(c % grid for c in cells) - min(c % grid for c in cells) == 1)
    assert blocks >= 0.5 * seg.unique().numel()


@pytest.mark.parametrize('scan', ['raster', 'hilbert'])
@pytest.mark.parametrize('boundary', ['gumbel', 'fixed'])
def test_segment_ids_agree_with_the_pooling(scan, boundary, monkeypatch):
    """Every patch is pooled exactly once, into the segment aux['segment_ids'] (row-major) names,
    and each pooled token is the mean of that segment's patches."""
    captured, pool_segments = {}, M.pool_segments

    def spy(x, b, count=None):
        captured['x'], (captured['pooled'], valid, sizes) = x, pool_segments(x, b, count)
        return captured['pooled'], valid, sizes
    monkeypatch.setattr(M, 'pool_segments', spy)
    torch.manual_seed(0)
    vit = DTPViT(tiny(boundary=boundary, scan=scan, compression=4)).train()
    _, aux = vit(torch.randn(4, 3, 32, 32))
    seg, b = aux['segment_ids'], aux['boundaries']
    raster_patches = captured['x'][:, vit.raster_order] if scan == 'hilbert' else captured['x']
    for i in range(4):
        assert sorted(seg[i].unique().tolist()) == list(range(int(aux['n_segments'][i])))
        # in scan order, segment ids are the runs cut by the boundaries
        assert torch.equal(seg[i][vit.scan_order], (b[i].cumsum(0) - b[i]).long())
        for s in range(int(aux['n_segments'][i])):
            expected = raster_patches[i][seg[i] == s].mean(0)
            assert torch.allclose(captured['pooled'][i, s], expected, atol=1e-5)


def test_hilbert_scan_leaves_the_plain_vit_unchanged(openclip_b32):
    d, images, texts, (ref_image, _) = openclip_b32
    model = load_openclip('ViT-B-32', str(d / 'raw.pt'), boundary='none', scan='hilbert').eval()
    with torch.no_grad():
        image, aux = model.visual(images)
    assert (image - ref_image).abs().max() <= 1e-5
    assert torch.equal(aux['segment_ids'], torch.arange(49).expand(3, 49))


def test_hilbert_scan_keeps_batch_invariance_determinism_and_the_task_gradient():
    torch.manual_seed(0)
    vit = DTPViT(tiny(scan='hilbert', eval_boundaries='threshold'))
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()  # thresholds near 0.5: segment counts differ between images
    images = torch.randn(5, 3, 32, 32)
    vit.eval()
    with torch.no_grad():
        batch, aux = vit(images)
        again, aux2 = vit(images)
        alone = torch.cat([vit(images[i:i + 1])[0] for i in range(5)])
    assert len(set(aux['n_segments'].tolist())) > 1
    assert torch.equal(batch, again) and torch.equal(aux['segment_ids'], aux2['segment_ids'])
    assert (batch - alone).abs().max() <= 1e-5
    vit.train()
    vit(images)[0].square().sum().backward()
    for name, p in vit.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# 8. training as evaluation: Gumbel-top-k samples, a position prior ----------------------------

def test_gumbel_topk_samples_exactly_k_boundaries_with_a_gradient():
    torch.manual_seed(0)
    logits = torch.randn(64, 36, requires_grad=True)
    b = M.gumbel_topk(logits, 9, temperature=0.5)
    assert (b.sum(1) == 9).all() and (b[:, -1] == 1).all() and torch.equal(b, b.round())
    (b * torch.randn(36)).sum().backward()
    assert logits.grad.abs().sum() > 0
    # sampled, not the deterministic top-k: different draws, favouring the larger logits
    logits = torch.linspace(-3, 3, 36).expand(4000, 36)
    draws = M.gumbel_topk(logits, 9, 0.5)
    assert len({tuple(d.tolist()) for d in draws[:20]}) > 1
    freq = draws[:, :-1].mean(0)
    assert freq[-10:].mean() > 3 * freq[:10].mean()


def test_topk_training_keeps_evaluations_count_and_the_task_gradient():
    torch.manual_seed(0)
    vit = DTPViT(tiny(train_boundaries='topk', compression=4)).train()
    features, aux = vit(torch.randn(4, 3, 32, 32))
    assert aux['n_segments'].tolist() == [16] * 4  # round(64 / 4), as top-k evaluation
    features.square().sum().backward()
    for name, p in vit.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_position_prior_starts_as_fixed_pooling_and_learns():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    fixed = DTPViT(tiny(boundary='fixed', compression=4)).eval()
    vit = DTPViT(tiny(train_boundaries='topk', position_prior=2.0, compression=4)).eval()
    with torch.no_grad():
        assert torch.equal(vit(images)[1]['segment_ids'], fixed(images)[1]['segment_ids'])
    vit.train()
    features, aux = vit(images)
    features.square().sum().backward()
    assert vit.predictor.position_bias.grad.abs().sum() > 0
    assert 'predictor.position_bias' in dict(vit.named_parameters())  # new weights, like the predictor's



@pytest.mark.parametrize('scan, pairs', [('raster', False), ('hilbert', False), ('raster', True)])
def test_color_prior_starts_as_the_color_rule_and_learns(scan, pairs):
    """color_prior: the predictor starts with the 'color' rule's cuts (same top-k, any scan order, reading one
    patch or pairs, as config/shapes_pairscolor10x.py), and both REINFORCE and the straight-through gradient
    reach the gain that weighs the colour changes."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    color = DTPViT(tiny(boundary='color', compression=4, scan=scan)).eval()
    vit = DTPViT(tiny(train_boundaries='reinforce', color_prior=4.0, compression=4, scan=scan,
                      predictor_pairs=pairs)).eval()
    with torch.no_grad():
        assert torch.equal(vit(images)[1]['segment_ids'], color(images)[1]['segment_ids'])
        assert not torch.equal(vit(images)[1]['segment_ids'], DTPViT(tiny(boundary='fixed'))(images)[1]['segment_ids'])
    features, aux = vit.train()(images)
    reinforce_loss(features.square().sum(1), aux['boundary_log_prob']).backward()
    assert vit.predictor.color_gain.grad.abs() > 0
    assert 'predictor.color_gain' in dict(vit.named_parameters())  # the router's lr, not the backbone's
    topk = DTPViT(tiny(train_boundaries='topk', color_prior=4.0, compression=4, scan=scan,
                       predictor_pairs=pairs)).train()
    topk(images)[0].square().sum().backward()
    assert topk.predictor.color_gain.grad.abs() > 0


@pytest.mark.parametrize('settings, message', [(dict(color_prior=-1.0), 'must be >= 0'),
                                               (dict(color_prior=2.0, boundary='fixed'), "needs boundary='gumbel'"),
                                               (dict(predictor_pairs=True, boundary='color'), "needs boundary='gumbel'")])
def test_color_prior_refuses_what_it_cannot_do(settings, message):
    with pytest.raises(ValueError, match=message):
        DTPConfig(**settings)

# REINFORCE (train_boundaries='reinforce') ----------------------------------------------------------

def test_reinforce_draws_are_plackett_luce_and_their_log_probability_is_exact():
    """One patch drawn (k = 2, the last patch being the other boundary): the draw's log-probability is the
    log-softmax of logits / noise at the drawn patch, and draws come at those frequencies."""
    torch.manual_seed(0)
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0, 0.0]).expand(40000, 5)
    for noise in (1.0, 0.5):
        hard, log_prob = M.sampled_topk(logits, 2, noise)
        assert hard.sum(1).eq(2).all() and hard[:, -1].eq(1).all()
        drawn = hard[:, :-1].argmax(1)
        expected = torch.log_softmax(logits[:, :-1] / noise, 1).gather(1, drawn[:, None]).squeeze(1)
        assert torch.allclose(log_prob, expected, atol=1e-6)
        frequency = torch.bincount(drawn, minlength=4) / len(drawn)
        assert torch.allclose(frequency, torch.softmax(logits[0, :-1] / noise, 0), atol=0.01)


def test_reinforce_learns_to_draw_the_rewarded_boundary():
    """REINFORCE on bare logits, 3 patches drawn of 15 (ordered draws): a loss of 0 for the draws that
    cut after patch 5 and 1 for the others makes that cut nearly certain (1 in 5 at first)."""
    torch.manual_seed(0)
    logits = torch.zeros(16, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    for _ in range(200):
        hard, log_prob = M.sampled_topk(logits.expand(64, 16), 4)
        optimizer.zero_grad()
        reinforce_loss(1 - hard[:, 5], log_prob).backward()
        optimizer.step()
    hard, _ = M.sampled_topk(logits.detach().expand(2000, 16), 4)
    assert hard[:, 5].mean() > 0.95 and hard.sum(1).eq(4).all()


def test_reinforce_trains_the_predictor_alone_from_the_task_loss():
    torch.manual_seed(0)
    vit = DTPViT(tiny(train_boundaries='reinforce', position_prior=2.0, compression=4))
    fixed = DTPViT(tiny(boundary='fixed', compression=4)).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # it starts exactly at its prior, fixed pooling, and evaluates deterministically
        assert torch.equal(vit.eval()(images)[1]['segment_ids'], fixed(images)[1]['segment_ids'])
        assert torch.equal(vit(images)[0], vit(images)[0])
    features, aux = vit.train()(images)
    assert aux['n_segments'].tolist() == [16] * 4 and aux['boundary_log_prob'].shape == (4,)
    task = features.square().sum(1)  # each image's own task loss
    # The task loss itself sends the predictor nothing (hard samples, detached input) ...
    task.sum().backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in vit.predictor.parameters())
    backbone = {n: p.grad.clone() for n, p in vit.named_parameters() if 'predictor' not in n}
    assert backbone['conv1.weight'].any()
    # ... REINFORCE on it does, and to the predictor alone.
    reinforce_loss(task, aux['boundary_log_prob']).backward()
    assert vit.predictor.position_bias.grad.any() and vit.predictor[-1].weight.grad.any()
    assert all(torch.equal(p.grad, backbone[n]) for n, p in vit.named_parameters() if 'predictor' not in n)


DEMO_ROUTER = dict(reinforce_baseline='greedy', train_on_greedy=True, min_segment=2, color_prior=4.0,
                   predictor_pairs=True)  # config/shapes_router4x.py's router


@pytest.mark.parametrize('router', [{}, DEMO_ROUTER], ids=['plain', 'demo'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_reinforce_in_mixed_precision_is_finite(dtype, router):
    torch.manual_seed(0)
    vit = DTPViT(tiny(train_boundaries='reinforce', compression=4, extent_embedding=True, **router)).train()
    with torch.autocast('cpu', dtype=dtype):
        features, aux = vit(torch.randn(4, 3, 32, 32))
        task = features.float().square().sum(1)
    loss = task.mean() + reinforce_loss(task, aux['boundary_log_prob'])
    loss.backward()
    assert torch.isfinite(loss) and vit.predictor[-1].weight.grad.any()
    assert all(torch.isfinite(p.grad).all() for p in vit.parameters() if p.grad is not None)


def twin_routers(differs, **shared):
    """A REINFORCE tower with the settings `differs` and a twin without them, with the same weights: a router
    that has moved away from fixed pooling's cuts and depends on the content, and extent embeddings not zero."""
    torch.manual_seed(0)
    common = dict(train_boundaries='reinforce', position_prior=2.0, compression=4, extent_embedding=True, **shared)
    vit, twin = DTPViT(tiny(**common, **differs)), DTPViT(tiny(**common))
    with torch.no_grad():
        vit.predictor[-1].weight.normal_()
        vit.extent_embedding['start'].normal_()
    twin.load_state_dict(vit.state_dict())
    return vit, twin


def test_the_greedy_baseline_pass_computes_what_evaluation_computes():
    """reinforce_baseline='greedy': besides the sampled features (with their gradient), training returns
    the features of the same images with their top-k cuts, which are exactly the eval-mode features, carry
    no gradient, and leave the sampled pass as it was without the baseline."""
    vit, plain = twin_routers(dict(reinforce_baseline='greedy'))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, eval_aux = vit.eval()(images)
    assert not torch.equal(eval_aux['segment_ids'], DTPViT(tiny(boundary='fixed'))(images)[1]['segment_ids'])
    torch.manual_seed(1)
    features, aux = vit.train()(images)
    torch.manual_seed(1)
    unbaselined, _ = plain.train()(images)
    assert torch.allclose(aux['greedy_features'], expected, atol=1e-6) and not aux['greedy_features'].requires_grad
    assert torch.equal(features, unbaselined) and not torch.allclose(features, expected, atol=1e-3)
    assert 'greedy_boundaries' not in aux and 'greedy_features' not in vit.eval()(images)[1]


def test_train_on_greedy_trains_on_the_eval_cuts_and_only_scores_the_sample():
    """train_on_greedy: the features that carry the gradient are the eval-mode ones (the top-k cuts), and the
    sample is the one the default order would have trained on, scored without gradient; its distortion and
    the greedy cuts' are the default order's too, and REINFORCE on their difference still reaches the router."""
    vit, default = twin_routers(dict(train_on_greedy=True), reinforce_baseline='greedy')
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, eval_aux = vit.eval()(images)
    torch.manual_seed(1)
    features, aux = vit.train()(images)
    torch.manual_seed(1)
    sampled, default_aux = default.train()(images)
    assert torch.allclose(features, expected, atol=1e-6) and features.requires_grad
    assert torch.equal(aux['boundaries'], eval_aux['boundaries']) and 'sampled_boundaries' not in aux
    assert torch.allclose(aux['sample_features'], sampled, atol=1e-6) and not aux['sample_features'].requires_grad
    assert not torch.allclose(aux['sample_features'], features, atol=1e-3)  # the sample moved some cuts
    assert torch.equal(aux['greedy_features'], features.detach())
    assert torch.allclose(aux['boundary_log_prob'], default_aux['boundary_log_prob'])
    for key in ('pooling_distortion', 'greedy_distortion'):
        assert torch.allclose(aux[key], default_aux[key])
    task = features.square().sum(1)
    reward = aux['sample_features'].square().sum(1) - aux['greedy_features'].square().sum(1)
    (task.mean() + reinforce_loss(reward, aux['boundary_log_prob'])).backward()
    assert vit.predictor[-1].weight.grad.any() and vit.transformer.resblocks[-1].mlp.c_fc.weight.grad.any()


def test_train_on_greedy_needs_the_greedy_baseline():
    with pytest.raises(ValueError, match="train_on_greedy=True needs reinforce_baseline='greedy'"):
        DTPConfig(train_boundaries='reinforce', train_on_greedy=True)


def test_with_the_greedy_baseline_a_sample_equal_to_the_greedy_cuts_teaches_nothing():
    """Noise too small to move any boundary: every sample is the greedy cut, its loss the baseline's,
    so the reward (sampled minus greedy loss) is 0 and REINFORCE sends the predictor no gradient. With
    the batch-mean baseline the same samples still push (each image's loss against the others')."""
    torch.manual_seed(0)
    for baseline, moves in (('greedy', False), ('batch', True)):
        vit = DTPViT(tiny(train_boundaries='reinforce', position_prior=2.0, compression=4, boundary_noise=1e-4,
                          reinforce_baseline=baseline)).train()
        features, aux = vit(torch.randn(4, 3, 32, 32))
        task = features.square().sum(1)
        if baseline == 'greedy':
            assert torch.allclose(task, aux['greedy_features'].square().sum(1))
            task = task - aux['greedy_features'].square().sum(1)
        reinforce_loss(task, aux['boundary_log_prob']).backward()
        assert bool(vit.predictor.position_bias.grad.any()) is moves


def test_the_greedy_baseline_needs_reinforce():
    with pytest.raises(ValueError, match="reinforce_baseline='greedy' needs train_boundaries='reinforce'"):
        DTPConfig(train_boundaries='topk', reinforce_baseline='greedy')


def test_pooling_distortion_is_the_share_of_variance_the_segment_means_lose():
    torch.manual_seed(0)
    x, b = torch.randn(3, 12, 5), (torch.rand(3, 12) < 0.3).float()
    b[:, -1] = 1
    got = M.pooling_distortion(x, b, M.pool_segments(x, b)[0])
    for i in range(3):  # by hand: each patch against its segment's mean, over each patch against the image's
        lost, start = 0.0, 0
        for end in b[i].nonzero().flatten().tolist():
            lost, start = lost + (x[i, start:end + 1] - x[i, start:end + 1].mean(0)).square().sum(), end + 1
        assert torch.allclose(got[i], lost / (x[i] - x[i].mean(0)).square().sum(), atol=1e-6)
    one = F.pad(torch.zeros(3, 11), (0, 1), value=1.0)  # a single segment: its mean is the image's
    assert torch.allclose(M.pooling_distortion(x, one, M.pool_segments(x, one)[0]), torch.ones(3))
    assert M.pooling_distortion(x, torch.ones(3, 12), x).abs().max() < 1e-6  # a patch per segment: nothing lost


@pytest.mark.parametrize('reads', [dict(color_prior=0.1), dict(predictor_pairs=True)])
def test_reinforce_with_the_distortion_cost_learns_where_the_patches_change(reads):
    """REINFORCE on the pooling distortion alone (distortion_weight's term, against the greedy cuts): in
    images of three runs of one colour each, the router starts at fixed pooling's evenly spaced cuts and
    ends cutting where the runs end, with far less lost by the segments' means. It learns to weigh the
    colour change between patches (color_prior, its gain starting too small to matter) or, reading pairs
    of neighbouring patches, to see the change in their features."""
    torch.manual_seed(0)
    vit = DTPViT(tiny(train_boundaries='reinforce', reinforce_baseline='greedy', position_prior=2.0, compression=5,
                      image_size=16, patch_size=4, **reads))  # 16 patches, 3 segments: 2 cuts to place

    def images(n):  # cuts after two random patches of each image, which close its first two runs
        changes = torch.rand(n, 15).argsort(1)[:, :2]
        run = (torch.arange(16) > changes[:, :1]).long() + (torch.arange(16) > changes[:, 1:]).long()  # (n, 16)
        colours = torch.randn(n, 3, 3).gather(2, run[:, None].expand(-1, 3, -1)).view(n, 3, 4, 4)
        x = colours.repeat_interleave(4, 2).repeat_interleave(4, 3) + 0.05 * torch.randn(n, 3, 16, 16)
        return x, F.one_hot(changes, 16).sum(1)  # the images and their (n, 16) true cuts

    def greedy(x):
        with torch.no_grad():
            _, aux = vit.train()(x)
            return aux['greedy_distortion'].mean().item()

    x, truth = images(256)
    start, fixed = greedy(x), DTPViT(tiny(boundary='fixed', compression=5, image_size=16, patch_size=4))
    assert torch.equal(vit.eval()(x)[1]['boundaries'], fixed(x)[1]['boundaries'])
    optimizer = torch.optim.Adam(vit.predictor.parameters(), lr=0.05)
    for _ in range(100):
        _, aux = vit.train()(images(32)[0])
        optimizer.zero_grad()
        reinforce_loss(distortion_cost(aux), aux['boundary_log_prob']).backward()
        optimizer.step()
    cuts = vit.eval()(x)[1]['boundaries'][:, :-1]
    assert (cuts * truth[:, :-1]).sum() > 0.75 * cuts.sum()  # where a colour ends (2 in 15 by chance)
    assert greedy(x) < 0.65 * start and ('color_prior' not in reads or vit.predictor.color_gain > 1)


def test_predictor_pairs_lets_a_boundary_see_the_next_patch():
    """predictor_pairs: the logit of patch t reads patch t + 1 too (the change between them); the plain
    predictor's reads patch t alone. The last patch has no next one and reads only itself."""
    torch.manual_seed(0)
    patches = torch.randn(2, 64, 32)
    for pairs in (False, True):
        vit = DTPViT(tiny(predictor_pairs=pairs)).eval()
        jacobian = torch.autograd.functional.jacobian(lambda p: vit.predict_boundaries(p)[1], patches[:1])[0, :, 0]
        reads = jacobian.abs().sum(-1) > 0  # (64 logits, 64 patches): does logit t depend on patch j
        expected = torch.eye(64, dtype=torch.bool) | (torch.ones(63).diag(1).bool() & pairs)
        assert torch.equal(reads, expected)


def test_the_pooling_distortion_is_reported_where_reinforce_can_use_it():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    vit = DTPViT(tiny(train_boundaries='reinforce', reinforce_baseline='greedy', compression=4, boundary_noise=1e-4))
    with torch.no_grad():
        vit.predictor[-1].weight.normal_()  # distinct logits: the tiny noise moves no cut
        _, aux = vit.train()(images)
        assert aux['pooling_distortion'].shape == (4,) and aux['pooling_distortion'].gt(0).all()
        assert torch.allclose(aux['pooling_distortion'], aux['greedy_distortion'])  # the same cuts
        assert 'pooling_distortion' not in vit.eval()(images)[1]
        assert 'pooling_distortion' not in DTPViT(tiny(train_boundaries='topk')).train()(images)[1]


def test_reinforce_needs_noise():
    with pytest.raises(ValueError, match="reinforce' needs boundary_noise > 0"):
        DTPConfig(train_boundaries='reinforce', boundary_noise=0.0)


@pytest.mark.parametrize('temperature', [0.0, -0.5])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match=r'DTPConfig\.temperature=.*must be > 0'):
        DTPConfig(temperature=temperature)


@pytest.mark.parametrize('size', [35, 28, 64])
def test_images_of_the_wrong_size_are_refused(size):
    """35 px into a 32 px model of 8 px patches used to be cropped silently to 32 px; 28 px gave 9 patches."""
    vit = DTPViT(tiny(patch_size=8)).eval()
    with pytest.raises(ValueError, match=rf'takes \(B, 3, 32, 32\) images, got \(2, 3, {size}, {size}\)'):
        vit(torch.randn(2, 3, size, size))
    with pytest.raises(ValueError, match=r'takes \(B, 3, 32, 32\) images'):
        vit(torch.randn(3, 32, 32))  # a single image without its batch dimension


@pytest.mark.parametrize('detach', [False, True])
def test_detach_predictor_input_keeps_the_predictor_gradient_out_of_the_pre_layers(detach):
    """The boundary loss reaches the backbone only through the predictor's input: detached, the
    pre-layers get none of it, while the predictor still learns."""
    torch.manual_seed(0)
    vit = DTPViT(tiny(detach_predictor_input=detach)).train()
    _, aux = vit(torch.randn(4, 3, 32, 32))
    aux['boundary_loss'].backward()
    pre = vit.transformer.resblocks[0].mlp.c_fc.weight.grad
    assert vit.predictor[1].weight.grad.abs().sum() > 0
    assert (pre is None or pre.abs().sum() == 0) == detach


@pytest.mark.parametrize('train_boundaries', ['bernoulli', 'topk'])
def test_boundary_noise_zero_trains_on_the_boundaries_evaluation_takes(train_boundaries):
    """boundary_noise=0: training's boundaries are deterministic and the ones evaluation takes (top-k for
    'topk', logits > 0 for 'bernoulli'), and the task gradient still reaches the predictor."""
    torch.manual_seed(0)
    eval_boundaries = 'topk' if train_boundaries == 'topk' else 'threshold'
    vit = DTPViT(tiny(train_boundaries=train_boundaries, eval_boundaries=eval_boundaries, boundary_noise=0.0))
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()  # logits on both sides of 0
    images = torch.randn(4, 3, 32, 32)
    vit.train()
    features, aux = vit(images)
    assert torch.equal(aux['boundaries'], vit(images)[1]['boundaries'])
    with torch.no_grad():
        assert torch.equal(aux['boundaries'], vit.eval()(images)[1]['boundaries'])
    features.square().sum().backward()
    for name, p in vit.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match=r'DTPConfig\.boundary_noise=-1.0: must be >= 0'):
        DTPConfig(boundary_noise=-1.0)


def test_size_bias_weighs_a_key_as_that_many_copies():
    """Attention with + log(s) on a key's logit equals attention over s copies of that key."""
    torch.manual_seed(0)
    attn = M.Attention(8, 2)
    a, b = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    bias = torch.log(torch.tensor([1.0, 3.0]))[None, None, None, :]
    with torch.no_grad():
        weighted = attn(torch.cat([a, b], dim=1), attn_bias=bias)
        copies = attn(torch.cat([a, b, b, b], dim=1))
    assert torch.allclose(weighted, copies[:, :2], atol=1e-6)


def test_size_attention_uses_the_segment_sizes_and_keeps_batch_invariance():
    """size_attention: the bias is log(patches per segment) ([CLS] 0, padding -inf); an image's
    features do not depend on its batch-mates; the task loss reaches the predictor; with one segment
    per patch (all sizes 1) it is the model without it."""
    torch.manual_seed(0)
    vit = DTPViT(tiny(size_attention=True, eval_boundaries='threshold')).eval()
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()  # segment counts differ from image to image
        images = torch.randn(5, 3, 32, 32)
        batch, aux = vit(images)
        alone = torch.cat([vit(images[i:i + 1])[0] for i in range(5)])
        assert len(set(aux['n_segments'].tolist())) > 1
        assert (batch - alone).abs().max() <= 1e-5
        sizes = aux['segment_sizes']
        counts = torch.stack([torch.bincount(ids, minlength=sizes.shape[1]) for ids in aux['segment_ids']])
        assert torch.equal(sizes, counts.float())  # patches per segment, 0 at the padding
        every_patch = torch.ones(5, 64)
        plain = DTPViT(tiny(eval_boundaries='threshold')).eval()
        plain.load_state_dict(vit.state_dict())
        assert torch.allclose(vit(images, every_patch)[0], plain(images, every_patch)[0], atol=1e-5)
        assert not torch.allclose(vit(images)[0], plain(images)[0], atol=1e-3)
    vit.train()
    features, _ = vit(images)
    features.square().sum().backward()
    for name, p in vit.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cosine_router_cuts_where_the_tokens_change_without_training():
    """boundary='cosine' has no weights: at initialisation it already closes segments where a token
    sequence changes (4 runs of 16 equal tokens, plus noise: boundaries after patches 15, 31, 47, 63),
    in any image of the batch, deterministically, in training as in evaluation."""
    torch.manual_seed(0)
    vit = DTPViT(tiny(boundary='cosine', compression=16))  # 64 patches -> 4 segments
    assert not any('predictor' in k for k in vit.state_dict())
    runs = torch.randn(2, 4, 1, 32).expand(2, 4, 16, 32).reshape(2, 64, 32)
    patches = runs + 0.05 * torch.randn(2, 64, 32)
    for mode in (vit.train(), vit.eval()):
        b, logits, _ = mode.predict_boundaries(patches)
        assert logits is None
        assert [row.nonzero().flatten().tolist() for row in b] == [[15, 31, 47, 63]] * 2
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f, aux = vit(images)
        assert aux['n_segments'].tolist() == [4] * 4
        assert torch.allclose(f, torch.cat([vit(images[i:i + 1])[0] for i in range(4)]), atol=1e-5)


def test_color_router_cuts_where_the_colour_changes_without_training():
    """boundary='color' has no weights and reads the pixels: four bands of two patch rows in four
    colours (plus noise) are cut at the band edges, after patches 15, 31, 47 and 63 of the raster scan,
    in training as in evaluation, whatever the tower's weights; features stay batch-invariant."""
    torch.manual_seed(0)
    vit = DTPViT(tiny(boundary='color', compression=16))  # 64 patches of 4x4 px -> 4 segments
    assert not any('predictor' in k for k in vit.state_dict())
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [0.2, 0.2, 0.2]])
    bands = colours.repeat_interleave(8, dim=0)  # (32 pixel rows, 3)
    images = bands.T[None, :, :, None].expand(3, 3, 32, 32) + 0.1 * torch.randn(3, 3, 32, 32)
    for train in (True, False):
        _, aux = vit.train(train)(images)
        assert [row.nonzero().flatten().tolist() for row in aux['boundaries']] == [[15, 31, 47, 63]] * 3
        assert aux['segment_ids'].view(3, 8, 8)[:, :, 0].tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]] * 3
    _, other = DTPViT(tiny(boundary='color', compression=16)).eval()(images)  # other weights, same cuts
    assert torch.equal(other['boundaries'], aux['boundaries'])
    mixed = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f, _ = vit.eval()(mixed)
        assert torch.allclose(f, torch.cat([vit(mixed[i:i + 1])[0] for i in range(4)]), atol=1e-5)


def test_extent_embedding_marks_each_segments_first_and_last_patch():
    """With extent_embedding each pooled token gets start[first patch] + end[last patch] added: zero at
    initialisation (the same features as without it), then learned from the task loss alone, at the
    rows of the patches that start and end segments and nowhere else."""
    torch.manual_seed(0)
    vit = DTPViT(tiny(boundary='fixed', compression=16, extent_embedding=True))  # segments 0-15, ..., 48-63
    plain = DTPViT(tiny(boundary='fixed', compression=16))
    plain.load_state_dict({k: v for k, v in vit.state_dict().items() if 'extent' not in k})
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit(images)[0], plain(images)[0])
    vit(images)[0].square().sum().backward()
    for name, rows in (('start', [0, 16, 32, 48]), ('end', [15, 31, 47, 63])):
        grad = vit.extent_embedding[name].grad
        assert grad.abs().sum(dim=1).nonzero().flatten().tolist() == rows, name
    with torch.no_grad():  # embeddings that spell out their own row: the token names its extent
        vit.extent_embedding['start'][:, 0] = torch.arange(64.0)
        vit.extent_embedding['end'][:, 1] = 100 + torch.arange(64.0)
    b = torch.zeros(2, 64)
    b[0, [2, 9, 63]] = 1      # segments 0-2, 3-9, 10-63
    b[1, [0, 40, 62, 63]] = 1  # segments 0-0, 1-40, 41-62, 63-63
    extent = vit.extent(b, 4)[..., :2]
    assert extent[0].tolist() == [[0, 102], [3, 109], [10, 163], [0, 0]]  # the padding segment stays zero
    assert extent[1].tolist() == [[0, 100], [1, 140], [41, 162], [63, 163]]


@pytest.mark.parametrize('boundary,train_boundaries,training', [
    ('gumbel', 'bernoulli', False), ('gumbel', 'topk', True), ('gumbel', 'reinforce', True),
    ('fixed', 'bernoulli', True), ('color', 'bernoulli', False), ('cosine', 'bernoulli', True)])
def test_exact_segment_counts_need_no_host_sync(boundary, train_boundaries, training, monkeypatch):
    """Where every image gets exactly n_segments (top-k, evenly spaced), pooling does not read the count
    back from the device (on a GPU such a read stalls the host) and computes what the reading path computes."""
    torch.manual_seed(0)
    m = DTPViT(tiny(boundary=boundary, train_boundaries=train_boundaries, compression=5.0,
                    position_prior=2.0 if train_boundaries == 'reinforce' else 0.0)).train(training)
    images = torch.randn(3, 3, 32, 32)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, 'tolist', lambda t: reads.append(t) or real_tolist(t))
    torch.manual_seed(1)
    features, aux = m(images)
    assert reads == []
    assert (aux['n_segments'] == m.cfg.n_segments).all()
    torch.manual_seed(1)  # the same boundaries given from outside take the reading path: the same features
    given, _ = m(images, boundaries=aux['boundaries'])
    assert len(reads) == 1
    torch.testing.assert_close(given, features, rtol=0, atol=0)
    # a count that is not the batch's is caught, not turned into wrong pooling
    with pytest.raises(RuntimeError, match='segment count'):
        M.pool_segments(torch.randn(3, 64, 8), aux['boundaries'], count=m.cfg.n_segments + 1)


@pytest.mark.parametrize('n, k, m', [(36, 9, 2), (49, 12, 2), (36, 4, 4), (64, 16, 2), (16, 4, 2)])
def test_min_segment_cuts_keep_every_segment_that_long(n, k, m):
    """min_segment: k boundaries, every segment at least m patches, in the draws and in the cuts evaluation takes;
    those are the largest logits allowed, one after another, and with m = 1 exactly top-k."""
    torch.manual_seed(0)
    logits = torch.randn(200, n)
    for noise in (None, 1.0, 2.0):
        b, _ = M.spaced_cuts(logits, k, m, noise)
        sizes = torch.stack([torch.bincount(ids, minlength=k) for ids in M.segment_ids(b).long()])
        assert b.sum(1).eq(k).all() and b[:, -1].eq(1).all() and sizes.min() >= m
    assert torch.equal(M.spaced_cuts(logits, k, 1)[0], M.topk_boundaries(logits, k))
    best = M.spaced_cuts(logits, k, m)[0]
    first = logits[:, m - 1:n - m].argmax(1) + m - 1  # the first cut: the largest logit a cut may take
    assert best[torch.arange(200), first].eq(1).all()


def test_min_segment_draws_and_their_log_probability_are_exact():
    """One cut drawn in 8 patches with segments of at least 2: it is drawn among patches 1-5 with the probability
    softmax(logits / noise) over them, and its log-probability is that log-softmax. With 3 segments both cuts keep
    2 patches apart, and the log-probability's gradient reaches only the logits the draws chose among."""
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 1.0, -0.5, 0.3, 2.0, 0.0, 0.7, -1.0])
    for noise in (1.0, 2.0):
        hard, log_prob = M.spaced_cuts(logits.expand(40000, 8), 2, 2, noise)
        drawn = hard[:, :-1].argmax(1)
        expected = torch.log_softmax(logits[1:6] / noise, 0)
        assert drawn.ge(1).all() and drawn.le(5).all()
        assert torch.allclose(log_prob, expected[drawn - 1], atol=1e-6)
        frequency = torch.bincount(drawn - 1, minlength=5) / len(drawn)
        assert torch.allclose(frequency, expected.exp(), atol=0.01)
    hard, _ = M.spaced_cuts(logits.expand(1000, 8), 3, 2, 2.0)
    cuts = hard[:, :-1].nonzero()[:, 1].view(-1, 2)
    assert (cuts[:, 1] - cuts[:, 0]).ge(2).all()
    leaf = logits.clone().requires_grad_(True)
    M.spaced_cuts(leaf.expand(64, 8), 3, 2, noise=2.0)[1].sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[1:6].ne(0).all() and leaf.grad[[0, 6, 7]].eq(0).all()


def test_min_segment_refuses_what_it_cannot_keep():
    with pytest.raises(ValueError, match="min_segment=2 needs boundary='gumbel' and train_boundaries='reinforce'"):
        DTPConfig(min_segment=2)
    with pytest.raises(ValueError, match="needs eval_boundaries='topk'"):
        DTPConfig(train_boundaries='reinforce', min_segment=2, eval_boundaries='threshold')
    with pytest.raises(ValueError, match='must be >= 1'):
        DTPConfig(train_boundaries='reinforce', min_segment=0)
    with pytest.raises(ValueError, match='cannot all be sure to get 3'):  # 16 segments of 3 in 49 patches
        DTPConfig(train_boundaries='reinforce', min_segment=3, compression=3)
    DTPConfig(train_boundaries='reinforce', min_segment=2, compression=4)  # ViT-B-32 at 4x: 12 segments of 49


def test_min_segment_in_the_model_takes_its_cuts_everywhere():
    """With min_segment the cuts evaluation takes, and with train_on_greedy the ones training takes, are
    spaced_cuts' most probable ones (not top-k's), and the sampled ones keep every segment that long too."""
    torch.manual_seed(0)
    vit = DTPViT(tiny(train_boundaries='reinforce', reinforce_baseline='greedy', train_on_greedy=True, min_segment=2,
                      compression=4))
    with torch.no_grad():
        vit.predictor[-1].weight.normal_()
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        _, eval_aux = vit.eval()(images)
        _, train_aux = vit.train()(images)
    logits = eval_aux['boundary_logits']
    assert torch.equal(eval_aux['boundaries'], M.spaced_cuts(logits, 16, 2)[0])
    assert not torch.equal(eval_aux['boundaries'], M.topk_boundaries(logits, 16))
    assert torch.equal(train_aux['boundaries'], eval_aux['boundaries'])
    for aux in (eval_aux, train_aux):
        assert aux['segment_sizes'].min() >= 2 and aux['n_segments'].eq(16).all()
    plain = DTPViT(tiny(train_boundaries='reinforce', min_segment=2, compression=4))
    plain.load_state_dict(vit.state_dict())
    with torch.no_grad():
        _, sampled_aux = plain.train()(images)
    assert sampled_aux['segment_sizes'].min() >= 2 and torch.isfinite(sampled_aux['boundary_log_prob']).all()
