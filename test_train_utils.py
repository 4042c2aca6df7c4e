"""Tests of train_utils.py: the configurator and the shared training plumbing."""
import errno
import os
import re
import shutil
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch

import train_utils
from train_utils import (boundary_confidence, check_resume, check_settings, config_keys, configure, cosine_lr,
                         evaluate, param_groups, prepare_out_dir, save_checkpoint, save_val_segments, segment_quality,
                         trim_log)

DEFAULTS = dict(out_dir='out', batch_size=64, lr=5e-4, compile=False, compression=4.0, init_from='scratch',
                imagenet_val=None, betas=(0.9, 0.98))


def test_files_then_overrides_in_order(tmp_path):
    first, second = tmp_path / 'a.py', tmp_path / 'b.py'
    first.write_text("batch_size = 32\n_helper = 3\nlr = 1e-3 * _helper\n")
    second.write_text("batch_size = 16\n")
    config = configure(DEFAULTS, [str(first), str(second), '--out_dir=out/run-1', '--compile=True',
                                  '--compression=10', "--imagenet_val='/data/imagenet/val'", '--betas=(0.9, 0.95)'])
    assert config == dict(DEFAULTS, batch_size=16, lr=3e-3, out_dir='out/run-1', compile=True, compression=10.0,
                          imagenet_val='/data/imagenet/val', betas=(0.9, 0.95))
    assert type(config['compression']) is float  # an int given for a float default becomes a float


def test_unknown_key_names_it_and_close_matches(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown key 'batchsize'; did you mean 'batch_size'"):
        configure(DEFAULTS, ['--batchsize=8'])
    bad = tmp_path / 'bad.py'
    bad.write_text("compresion = 10.0\n")
    with pytest.raises(SystemExit, match=r"bad\.py.*'compresion'.*'compression'"):
        configure(DEFAULTS, [str(bad)])


def test_wrong_type_and_malformed_arguments_fail_clearly():
    with pytest.raises(SystemExit, match=r"batch_size=None: expected a int like the default 64"):
        configure(DEFAULTS, ['--batch_size=None'])
    assert configure(DEFAULTS, ['--imagenet_val=None'])['imagenet_val'] is None  # None where None is the default
    with pytest.raises(SystemExit, match=r"batch_size='big' is a str, expected a int"):
        configure(DEFAULTS, ['--batch_size=big'])
    with pytest.raises(SystemExit, match=r"compile=1 is a int, expected a bool"):
        configure(DEFAULTS, ['--compile=1'])
    with pytest.raises(SystemExit, match=r'--key=value'):
        configure(DEFAULTS, ['--lr'])
    with pytest.raises(SystemExit, match=r'no config file'):
        configure(DEFAULTS, ['config/does_not_exist.py'])


def test_the_renamed_model_setting_names_arch(tmp_path):
    """`model` (the OpenCLIP architecture) is now `arch`: an old command line or config file says so."""
    defaults = dict(DEFAULTS, arch='ViT-B-32')
    with pytest.raises(SystemExit, match=r"'model' is now called 'arch'; set arch='ViT-B-16'"):
        configure(defaults, ['--model=ViT-B-16'])
    old = tmp_path / 'old.py'
    old.write_text("model = 'ViT-B-16'\n")
    with pytest.raises(SystemExit, match=r"old\.py.*'model' is now called 'arch'"):
        configure(defaults, [str(old)])


def test_resume_compares_an_old_checkpoints_model_as_arch():
    old = dict(config=dict(model='ViT-B-32', batch_size=64))  # saved before the rename
    check_resume(dict(arch='ViT-B-32', batch_size=64), old, ['arch', 'batch_size'], 'ckpt.pt')
    with pytest.raises(SystemExit, match=r"arch='ViT-B-16' \(checkpoint: 'ViT-B-32'\)"):
        check_resume(dict(arch='ViT-B-16', batch_size=64), old, ['arch', 'batch_size'], 'ckpt.pt')


def test_resume_names_every_conflicting_setting_and_takes_a_checkpoint_without_settings():
    saved = dict(config=dict(arch='ViT-B-32', batch_size=64, lr=1e-3, seed=0))
    config = dict(arch='ViT-B-32', batch_size=32, lr=1e-3, seed=1)
    check_resume(config, saved, ['arch', 'lr'], 'out/ckpt.pt')  # a setting not in keys may change
    with pytest.raises(SystemExit) as stop:
        check_resume(config, saved, ['arch', 'batch_size', 'lr', 'seed'], 'out/ckpt.pt')
    assert str(stop.value) == ("init_from='resume': batch_size=32 (checkpoint: 64), seed=1 (checkpoint: 0) differ "
                               "from out/ckpt.pt; resume with the checkpoint's values, or start a new run in a new "
                               "out_dir to change them")
    check_resume(config, {}, ['arch', 'batch_size'], 'out/ckpt.pt')  # saved without settings: nothing to compare


def test_cosine_schedule():
    lrs = [cosine_lr(s, 100, 10, 1.0) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale():
    from model import CLIP, DTPConfig
    model = CLIP(DTPConfig(image_size=32, patch_size=8, width=32, heads=2, pre_layers=1, short_layers=1,
                           embed_dim=16), dict(context_length=8, width=32, heads=2, layers=1))
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    decay_names = {names[id(p)] for p in decay['params']}
    assert {'logit_scale', 'visual.class_embedding', 'visual.positional_embedding', 'visual.ln_pre.weight',
            'text.token_embedding.weight', 'visual.transformer.resblocks.0.attn.in_proj_bias'} <= no_decay_names
    assert {'visual.proj', 'visual.conv1.weight', 'visual.transformer.resblocks.0.attn.in_proj_weight',
            'visual.predictor.1.weight', 'text.text_projection'} <= decay_names
    assert len(decay_names) + len(no_decay_names) == len(names)


def test_router_lr_scale_gives_the_predictor_groups_of_its_own():
    """routers.py's learned router: the scripts pass its cfg.lr_scale, and its predictor (colour gain included)
    trains at lr x lr_scale in groups of its own; everything else, extent embeddings included, at lr."""
    import routers
    from model import load_openclip
    from train_utils import set_lr
    model = load_openclip('ViT-B-32', tower=routers.RouterViT, boundary='router', image_size=32, patch_size=8,
                          width=32, heads=2, pre_layers=1, short_layers=1, embed_dim=16,
                          text=dict(context_length=8, width=32, heads=2, layers=1))
    assert model.visual.cfg.lr_scale == 10.0  # RouterConfig's default
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model.named_parameters(), 0.1, model.visual.cfg.lr_scale)
    optimizer = torch.optim.AdamW(groups)
    set_lr(optimizer, 1e-3)
    router = {names[id(p)]: (g['lr'], g['weight_decay']) for g in optimizer.param_groups for p in g['params']
              if 'predictor' in names[id(p)]}
    assert router == {'visual.predictor.0.weight': (1e-2, 0.0), 'visual.predictor.0.bias': (1e-2, 0.0),
                      'visual.predictor.1.weight': (1e-2, 0.1), 'visual.predictor.1.bias': (1e-2, 0.0),
                      'visual.predictor.3.weight': (1e-2, 0.1), 'visual.predictor.3.bias': (1e-2, 0.0),
                      'visual.predictor.color_gain': (1e-2, 0.0)}
    assert model.visual.predictor[1].in_features == 2 * 32  # the router reads each patch and its change to the next
    extent = {names[id(p)]: (g['lr'], g['weight_decay']) for g in optimizer.param_groups for p in g['params']
              if 'extent_embedding' in names[id(p)]}
    assert extent == {'visual.extent_embedding.start': (1e-3, 0.0), 'visual.extent_embedding.end': (1e-3, 0.0)}
    assert all(g['lr'] == 1e-3 for g in optimizer.param_groups[:2])  # everything else, as without the scale
    assert sum(len(g['params']) for g in groups) == len(names)
    assert len(param_groups(model.named_parameters(), 0.1)) == 2  # scale 1: the two groups as before


def test_tower_class_follows_the_boundary_rule():
    import model
    import routers
    assert all(train_utils.tower_class(b) is routers.RouterViT for b in ('router', 'color', 'cosine'))
    assert all(train_utils.tower_class(b) is model.DTPViT for b in ('gumbel', 'fixed', 'none'))
    # the settings refused with the rules that learn nothing (test_settings_that_do_not_apply_are_refused)
    assert set(routers.LEARNED_ONLY) == {'min_segment', 'color_prior', 'noise', 'distortion_weight', 'lr_scale'}


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    save_checkpoint({'step': 1}, path)

    def crash(obj, f):  # dies half-way through writing the next checkpoint
        f.write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'step': 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'step': 1}  # the previous checkpoint is intact


def test_segment_purity_and_object_tokens_on_hand_made_segmentations():
    # Two images of 2x3 patches; the object covers patches 0, 1, 3 (an L shape) in both.
    objects = torch.tensor([[1, 1, 0, 1, 0, 0]] * 2, dtype=torch.bool)
    segments = torch.tensor([[0, 0, 1, 2, 3, 3],    # {0,1} object, {2} background, {3} object, {4,5} background
                             [0, 0, 0, 1, 1, 1]])   # {0,1,2} mixed, {3,4,5} mixed
    q = segment_quality(segments, objects)
    assert q['segments'] == 6 and q['pure'] == 4            # purity 4/6
    assert q['images_with_object'] == 2
    assert q['object_tokens'] == pytest.approx(2 / 3 + 2 / 3)  # 2 segments touch 3 object patches, each image
    # an image without object counts for purity only
    q = segment_quality(torch.tensor([[0, 0, 1, 1, 1, 2]]), torch.zeros(1, 6, dtype=torch.bool))
    assert (q['pure'], q['segments'], q['images_with_object'], q['object_tokens']) == (3, 3, 0, 0)


def test_evaluate_scores_each_half_of_a_shapes_class_on_its_own():
    """groups: an image counts for a group when its top-1 class lies in its label's group. Shapes labels
    are colour x shape: a red circle called a red square has the right colour and the wrong shape."""
    import data
    names = data.SHAPES_CLASSNAMES
    truth = ['red circle', 'yellow triangle', 'pink cross', 'blue star']
    called = ['red square', 'green triangle', 'pink cross', 'blue star']
    labels, predicted = (torch.tensor([names.index(n) for n in ns]) for ns in (truth, called))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(predicted, labels), batch_size=3)

    def logits_fn(prediction):  # the "image" is the class it will be called
        aux = dict(boundaries=torch.ones(len(prediction), 4), n_segments=torch.full((len(prediction),), 4))
        return torch.nn.functional.one_hot(prediction, len(names)).float(), aux
    result = evaluate(logits_fn, loader, torch.device('cpu'), groups=data.SHAPES_GROUPS)
    assert result['top1'] == 50 and result['colour_top1'] == 75 and result['shape_top1'] == 75
    assert 'colour_top1' not in evaluate(logits_fn, loader, torch.device('cpu'))


def test_evaluation_and_the_threshold_calibration_build_no_graph():
    """Evaluation runs without autograd (a graph of every val batch would hold their activations), and so does
    the router's threshold calibration that precedes it; calibration is nothing for a tower without it."""
    import routers
    grad_enabled = []

    def logits_fn(images):
        grad_enabled.append(torch.is_grad_enabled())
        return torch.zeros(len(images), 3), dict(boundaries=torch.ones(len(images), 4), n_segments=torch.full((2,), 4))
    evaluate(logits_fn, [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))], torch.device('cpu'))
    tower = routers.RouterViT(routers.RouterConfig(image_size=16, patch_size=4, width=16, heads=2, embed_dim=8,
                                                   pre_layers=1, short_layers=1, eval_boundaries='threshold'))
    scores = []
    tower.cut_scores = lambda images: (None, scores.append(torch.is_grad_enabled()) or torch.randn(len(images), 16))
    loader = [(torch.zeros(2, 3, 16, 16), torch.zeros(2)), None]  # None: a batch of unreadable images
    assert set(train_utils.calibrate_threshold(tower, loader, torch.device('cpu'))) == {'cut_threshold'}
    assert grad_enabled == [False] and scores == [False]
    tower.cfg.eval_boundaries = 'topk'
    assert train_utils.calibrate_threshold(tower, loader, torch.device('cpu')) == {}


def test_a_val_set_without_a_readable_image_is_no_crash(tmp_path):
    """Unreadable images come as None batches (data.collate): evaluation scores NaN and the picture of
    the segments takes the first readable batch, instead of a crash that would lose the run's last steps."""
    from model import DTPConfig, DTPViT
    visual = DTPViT(DTPConfig(image_size=16, patch_size=8, width=16, heads=2, embed_dim=8, pre_layers=1,
                              short_layers=1, boundary='fixed', compression=2.0)).eval()
    logits_fn = lambda images: (torch.zeros(len(images), 3), visual(images)[1])  # noqa: E731
    result = evaluate(logits_fn, [None, None], torch.device('cpu'))
    assert all(v != v for v in result.values())  # NaN
    png = tmp_path / 'b.png'
    save_val_segments(str(png), visual, [None, (torch.randn(2, 3, 16, 16), torch.zeros(2))], torch.device('cpu'), 'fp32')
    assert png.stat().st_size > 0


def test_two_runs_into_one_out_dir_cannot_both_write_it(tmp_path):
    """Both would pass the ckpt.pt check before either saved, then replace each other's checkpoints: the
    first holds out_dir/.lock for as long as it runs, and the second stops."""
    out = str(tmp_path / 'run')
    prepare_out_dir(out, 'scratch', False)
    try:
        with pytest.raises(SystemExit, match=r"is in use by another run .*\.lock"):
            prepare_out_dir(out, 'scratch', False)
    finally:
        for f in train_utils._locks:
            f.close()
        train_utils._locks.clear()
    prepare_out_dir(out, 'resume', False)  # the first run ended: the lock is free
    train_utils._locks.pop().close()


def test_boundary_confidence_on_hand_made_probabilities():
    p = torch.tensor([[0.9, 0.1, 0.9, 0.1, 0.5],
                      [0.3, 0.3, 0.3, 0.3, 0.3]])
    b = torch.tensor([[1., 0., 1., 0., 1.],
                      [0., 1., 0., 0., 1.]])
    c = boundary_confidence(torch.logit(p), b)
    assert c['prob_std'] == pytest.approx(0.4 + 0.0, abs=1e-6)  # the last patch is left out
    assert c['images_with_margin'] == 2
    assert c['margin'] == pytest.approx((0.9 - 0.1) + 0.0, abs=1e-6)


DEMO = dict(DEFAULTS, vision=dict(image_size=48, patch_size=8, width=128, heads=4, embed_dim=128),
            text=dict(width=128, heads=4, layers=2, context_length=32))


def test_dicts_are_merged_into_the_defaults(tmp_path):
    config = configure(DEMO, ["--vision={'image_size': 64}"])
    assert config['vision'] == dict(DEMO['vision'], image_size=64)  # not a 224 px, width-768 tower
    conf = tmp_path / 'c.py'
    conf.write_text("text = dict(layers=4)\n")
    assert configure(DEMO, [str(conf)])['text'] == dict(DEMO['text'], layers=4)
    # None clears a dict (the OpenCLIP architecture's own sizes); later pairs merge into what is left
    assert configure(DEMO, ['--vision=None', "--vision={'image_size': 64}"])['vision'] == {'image_size': 64}
    assert configure(DEMO, ['--text=None'])['text'] is None
    with pytest.raises(SystemExit, match=r"vision=\{\} changes nothing.*vision=None"):
        configure(DEMO, ['--vision={}'])


def test_command_line_pairs_apply_after_every_file(tmp_path):
    conf = tmp_path / 'c.py'
    conf.write_text("batch_size = 32\nlr = 1e-3\n")
    config = configure(DEFAULTS, ['--batch_size=8', str(conf), '--lr=0.1'])
    assert config['batch_size'] == 8 and config['lr'] == 0.1


def test_a_config_file_that_raises_is_named_above_its_traceback(tmp_path, capsys):
    conf = tmp_path / 'broken.py'
    conf.write_text("batch_size = 32\nlr = 1 / 0\n")
    with pytest.raises(ZeroDivisionError) as e:
        configure(DEFAULTS, [str(conf)])
    assert f'config file {conf}' in capsys.readouterr().err
    assert traceback.extract_tb(e.value.__traceback__)[-1][:2] == (str(conf), 2)  # the traceback still points at it


SETTINGS = dict(out_dir='out', vision=None, text=None, pre_layers=2, short_layers=4, boundary='gumbel',
                compression=4.0, temperature=0.5, eval_boundaries='topk', pool='cls', batch_size=128, epochs=16,
                max_steps=0, lr=2e-3, min_lr=1e-5, warmup_steps=100, log_interval=10, eval_interval=0,
                ckpt_interval=250, precision='bf16', eval_only=False)


@pytest.mark.parametrize('change, message', [
    (dict(vision={'compression': 10.0}), r"vision\['compression'\]: compression is a setting of its own; set it as "
                                         r"--compression="),
    (dict(vision={'pre_layers': 3}), r"vision\['pre_layers'\].*--pre_layers="),
    (dict(vision={'widht': 64}), r"vision\['widht'\]: no such DTPConfig field; did you mean 'width'"),
    (dict(text={'context_len': 32}), r"text\['context_len'\]: no such OpenCLIP text_cfg key; did you mean "
                                      r"'context_length'"),
    (dict(temperature=0.0), r'temperature=0.0: must be > 0'),
    (dict(temperature=-1.0), r'temperature=-1.0: must be > 0'),
    (dict(compression=0.5), r'compression=0.5'),
    (dict(precision='fp8'), r"precision='fp8': expected 'bf16', 'fp16' or 'fp32'"),
    (dict(batch_size=0), r'batch_size=0: must be >= 1'),
    (dict(lr=-1e-3), r'lr=-0.001: must be >= 0'),
    (dict(log_interval=0), r'log_interval=0: must be >= 1'),
    (dict(ckpt_interval=0), r'ckpt_interval=0: must be >= 1'),
    (dict(epochs=0, max_steps=0), r'epochs=0 and max_steps=0: nothing to train'),
    (dict(grad_clip=-1.0), r'grad_clip=-1.0: must be >= 0 \(0: off\)'),  # negative: gradient ascent, silently
    (dict(boundary='router', router={'lr_scale': -1.0}), r"router\['lr_scale'\]=-1.0: must be > 0"),
    (dict(boundary='router', router={'noise': 0.0}), r"router\['noise'\]=0.0: must be > 0"),
    (dict(boundary='router', router={'distortion_weight': -1.0}), r"router\['distortion_weight'\]=-1.0: must be >= 0"),
    (dict(boundary='router', router={'color_prior': -1.0}), r"router\['color_prior'\]=-1.0: must be >= 0"),
    (dict(boundary='router', router={'min_segment': 0}), r"router\['min_segment'\]=0: must be >= 1"),
    (dict(boundary='router', router={'min_segment': 2.0}), r"router\['min_segment'\]=2.0 is a float, expected a int"),
    (dict(boundary='router', router={'nosie': 3.0}), r"router\['nosie'\]: no such routers.RouterConfig setting; "
                                                     r"did you mean 'noise'"),
    (dict(boundary='router', router={'compression': 8.0}), r"router\['compression'\]: compression is a setting of "
                                                           r"its own; set it as --compression="),
    (dict(boundary='router', router={'width': 64}), r"router\['width'\]: no such routers.RouterConfig setting"),
    (dict(boundary='router', router=2), r'router=2: expected a dict of overrides or None'),
    (dict(boundary='rooter'), r"boundary='rooter': expected one of"),
    (dict(workers=-1), r'workers=-1: must be >= 0'),
    (dict(label_smoothing=1.5), r'label_smoothing=1.5: must be between 0 and 1'),
    (dict(imagenet_val=5), r'imagenet_val=5: expected the path'),
    (dict(shapes_style='texture'), r"shapes_style='texture': expected one of \('colour', 'clutter', 'count'\)"),
    (dict(vision={'image_size': '48'}), r"vision\['image_size'\]='48' is a str, expected a int"),
    (dict(text={'layers': 2.5}), r"text\['layers'\]=2.5 is a float, expected a int"),
])
def test_settings_that_would_fail_later_are_refused_up_front(change, message):
    check_settings(SETTINGS)  # the defaults pass
    with pytest.raises(SystemExit, match=r'config error: ' + message):
        check_settings(dict(SETTINGS, **change))


@pytest.mark.parametrize('change, message', [
    # a router dict with model.py's rules, which have none of its settings
    *[(dict(boundary=b, router={'min_segment': 2}), rf"router=\{{'min_segment': 2\}} applies to routers.py's rules; "
       rf".*\(got boundary='{b}'\)") for b in ('gumbel', 'fixed', 'none')],
    (dict(boundary='none', router={'size_attention': True}), r"router=\{'size_attention': True\} applies to routers"),
    # the learned router's settings with the rules that learn nothing
    *[(dict(boundary=b, router={key: value}), rf"router\['{key}'\] applies to boundary='router' only "
       rf"\(boundary='{b}' has no weights\)")
      for b in ('color', 'cosine') for key, value in (('min_segment', 2), ('color_prior', 4.0), ('noise', 3.0),
                                                      ('distortion_weight', 3.0), ('lr_scale', 10.0))],
    # threshold evaluation: the rules without weights have nothing to threshold (the learned router calibrates one)
    *[(dict(boundary=b, eval_boundaries='threshold'), r"eval_boundaries='threshold' needs a learned predictor")
      for b in ('color', 'cosine')],
], ids=lambda v: ','.join(f'{k}={v}' for k, v in v.items()).replace(' ', '') if isinstance(v, dict) else 'message')
def test_settings_that_do_not_apply_are_refused(change, message):
    """Each refused in one line naming the setting, instead of being silently ignored by the tower built."""
    with pytest.raises(SystemExit, match=r'^config error: ' + message) as e:
        check_settings(dict(SETTINGS, **change))
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('router', [None, {'size_attention': True}])
@pytest.mark.parametrize('boundary', ['router', 'color', 'cosine'])
def test_routers_settings_that_apply_are_accepted(boundary, router):
    check_settings(dict(SETTINGS, boundary=boundary, router=router))
    if boundary == 'router':
        check_settings(dict(SETTINGS, boundary=boundary, router=dict(min_segment=1, color_prior=0.0, noise=1.0,
                                                                     distortion_weight=0.0, lr_scale=1.0)))


def run_settings(script, *args):
    """A training script's settings after its config files and --key=value arguments, as a run sees them."""
    return configure(script_settings(script), [str(HERE / a) if a.endswith('.py') else a for a in args])


@pytest.mark.parametrize('script, config', [('train_clip.py', 'config/shapes_tiny.py'),
                                            ('train_cls.py', 'config/shapes_cls_tiny.py')])
def test_min_segment_is_judged_on_the_runs_geometry(script, config):
    """The tiny configs' towers see 32 px in 8 px patches: 16 patches, 4 segments at 4x. min_segment 3 can be
    guaranteed there (the RouterConfig bound: N - 2 m >= (k - 2)(2 m - 1), 10 >= 10), 4 cannot (8 < 14). The
    check used to build the config at the architecture's default 224 px (49 patches, 12 segments), where 3
    already cannot: it refused a setting the run can have, with the wrong numbers."""
    for m in (1, 2, 3):
        check_settings(run_settings(script, config, '--boundary=router', f"--router={{'min_segment': {m}}}"))
    with pytest.raises(SystemExit, match=r"^config error: router\['min_segment'\]=4: 4 segments of 16 patches cannot "
                                         r'all be sure to get 4 or more') as e:
        check_settings(run_settings(script, config, '--boundary=router', "--router={'min_segment': 4}"))
    assert '\n' not in str(e.value)
    # without the vision overrides the architecture's own geometry is the run's: ViT-B-32 at 224 px, then ViT-B-16
    with pytest.raises(SystemExit, match=r"min_segment'\]=3: 12 segments of 49 patches"):
        check_settings(run_settings(script, config, '--vision=None', '--boundary=router',
                                    "--router={'min_segment': 3}"))
    check_settings(run_settings(script, config, '--vision=None', '--boundary=router', "--router={'min_segment': 2}"))
    with pytest.raises(SystemExit, match=r"min_segment'\]=3: 49 segments of 196 patches"):
        check_settings(run_settings(script, config, '--vision=None', '--arch=ViT-B-16', '--boundary=router',
                                    "--router={'min_segment': 3}"))


def test_short_layers_none_means_the_architectures_depth():
    """--short_layers=None is accepted (it is documented as the architecture's depth minus pre_layers), and
    load_openclip gets no short_layers, so it builds that depth; other settings' None is still refused."""
    config = run_settings('train_clip.py', 'config/shapes_tiny.py', '--short_layers=None')
    assert config['short_layers'] is None
    check_settings(config)
    assert 'short_layers' not in train_utils.new_model_args(config)
    with pytest.raises(SystemExit, match=r'pre_layers=None: expected a int'):
        run_settings('train_clip.py', 'config/shapes_tiny.py', '--pre_layers=None')


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    check_settings(dict(SETTINGS, out_dir=str(tmp_path / 'new')))  # a directory to be created is fine
    (tmp_path / 'notes.txt').write_text('')
    with pytest.raises(SystemExit, match=r"out_dir=.*notes\.txt' is a file"):
        check_settings(dict(SETTINGS, out_dir=str(tmp_path / 'notes.txt')))
    check_settings(dict(SETTINGS, epochs=0, max_steps=0, eval_only=True))  # evaluating needs no steps


def test_disk_full_is_a_clear_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    save_checkpoint({'step': 1}, str(path))

    def disk_full(obj, f):
        f.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(SystemExit, match=rf'{path}: No space left on device \(\d+ MiB free there\)'):
        save_checkpoint({'step': 2}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['ckpt.pt'] and torch.load(path, weights_only=True) == {'step': 1}


@pytest.mark.parametrize('in_cwd', [False, True])
@pytest.mark.parametrize('error, reason', [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 'No space left on device'),
    (RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed\nfrom a C++ frame'),
     'PytorchStreamWriter failed writing file data/0: file write failed')])  # torch's own way of saying it
def test_a_failed_checkpoint_write_names_its_reason_and_the_free_space_where_it_writes(
        tmp_path, monkeypatch, error, reason, in_cwd):
    asked = []

    def disk_usage(where):
        asked.append(where)
        return types.SimpleNamespace(free=6 * 2 ** 20 + 1000)

    def fails(obj, f):
        raise error
    monkeypatch.setattr(shutil, 'disk_usage', disk_usage)
    monkeypatch.setattr(torch, 'save', fails)
    if in_cwd:
        monkeypatch.chdir(tmp_path)
    path = 'ckpt.pt' if in_cwd else str(tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit) as stop:
        save_checkpoint({'step': 1}, path)
    assert str(stop.value) == (f'could not write the checkpoint {path}: {reason} (6 MiB free there); '
                               f'the previous checkpoint, if any, is intact')
    assert asked == ['.' if in_cwd else str(tmp_path)] and os.listdir(tmp_path) == []


def test_a_checkpoint_into_a_deleted_out_dir_and_other_errors(tmp_path, monkeypatch):
    """out_dir deleted under the run: the error says so (no temporary file to remove, no disk to measure);
    an error that is not a failed write propagates as it is, and leaves no temporary file either."""
    with pytest.raises(SystemExit, match=r"gone/ckpt\.pt: No such file or directory \(no such directory\)"):
        save_checkpoint({'step': 1}, str(tmp_path / 'gone' / 'ckpt.pt'))

    def fails(obj, f):
        f.write(b'x')
        raise RuntimeError('CUDA error: an illegal memory access was encountered')
    monkeypatch.setattr(torch, 'save', fails)
    with pytest.raises(RuntimeError, match='^CUDA error: an illegal memory access'):
        save_checkpoint({'step': 1}, str(tmp_path / 'ckpt.pt'))
    assert os.listdir(tmp_path) == []


def test_save_run_writes_the_training_state_and_restore_optimizer_reads_it_back(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=512.0)
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    monkeypatch.setattr(sys, 'argv', ['/somewhere/train_clip.py', '--seed=1'])
    path, log = tmp_path / 'ckpt.pt', tmp_path / 'log.jsonl'
    train_utils.save_run(str(path), module, optimizer, scaler, 7, torch.tensor(2.5), 'cpu', 1, False)
    assert not path.exists()  # only rank 0 writes
    train_utils.save_run(str(path), module, optimizer, scaler, 7, torch.tensor(2.5), 'cpu', 1, True, config={'a': 1})
    ckpt = torch.load(path, weights_only=True)
    assert sorted(ckpt) == ['config', 'model', 'optimizer', 'scaler', 'script', 'step', 'world_size']
    assert (ckpt['step'], ckpt['script'], ckpt['world_size'], ckpt['config']) == (7, 'train_clip.py', 1, {'a': 1})
    assert all(torch.equal(ckpt['model'][k], v) for k, v in module.state_dict().items())
    assert ckpt['scaler'] == scaler.state_dict() and ckpt['scaler']['scale'] == 512.0

    log.write_text('{"step": 5}\n{"step": 10}\n')
    fresh = torch.optim.AdamW(module.parameters(), lr=0.1)
    fresh_scaler = torch.amp.GradScaler('cpu', init_scale=2.0)
    train_utils.restore_optimizer(ckpt, fresh, fresh_scaler, str(log), master=False)
    assert log.read_text() == '{"step": 5}\n{"step": 10}\n'  # only rank 0 touches the log
    train_utils.restore_optimizer(ckpt, fresh, fresh_scaler, str(log), master=True)
    assert log.read_text() == '{"step": 5}\n' and fresh_scaler.get_scale() == 512.0
    state, saved = fresh.state_dict()['state'][0], optimizer.state_dict()['state'][0]
    assert all(torch.equal(state[k], saved[k]) for k in ('step', 'exp_avg', 'exp_avg_sq'))


@pytest.mark.parametrize('bad', ['loss', 'weights'])
def test_save_run_never_writes_non_finite_weights_and_says_what_it_kept(tmp_path, bad):
    module = torch.nn.Linear(3, 2)
    optimizer, scaler = torch.optim.SGD(module.parameters(), lr=0.1), torch.amp.GradScaler(enabled=False)
    loss = torch.tensor(float('nan') if bad == 'loss' else 1.0)
    if bad == 'weights':
        with torch.no_grad():
            module.bias[1] = float('inf')
    path = tmp_path / 'ckpt.pt'
    message = r"^step 12: the loss or the weights are NaN or infinite, training diverged; stopped, {}\. Try a lower lr"
    with pytest.raises(SystemExit, match=message.format('no checkpoint was written')):
        train_utils.save_run(str(path), module, optimizer, scaler, 12, loss, 'cpu', 1, True)
    save_checkpoint({'step': 10}, str(path))
    with pytest.raises(SystemExit, match=message.format(f'{path} is left as it was')):
        train_utils.save_run(str(path), module, optimizer, scaler, 12, loss, 'cpu', 1, True)
    assert torch.load(path, weights_only=True) == {'step': 10}


def test_two_runs_saving_at_once_do_not_collide(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    save = torch.save

    def save_while_another_run_saves(obj, f):
        save(obj, f)
        if obj['step'] == 1:  # the other run writes its checkpoint in the middle of this one's
            save_checkpoint({'step': 2}, path)
    monkeypatch.setattr(torch, 'save', save_while_another_run_saves)
    save_checkpoint({'step': 1}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'step': 1} and os.listdir(tmp_path) == ['ckpt.pt']


def test_out_dir_holding_a_checkpoint_is_only_resumed_or_evaluated(tmp_path):
    """prepare_out_dir refuses a new run into an out_dir with a ckpt.pt (its first save would replace it), lets
    a resume or an evaluation in, and returns the paths of the log and the checkpoint; the run holds out_dir/.lock."""
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'a checkpoint')
    with pytest.raises(SystemExit, match=rf"^{out}/ckpt\.pt exists: pass --init_from=resume to continue that run, "
                                         r"or a new --out_dir \(or delete it\) to start another$"):
        prepare_out_dir(str(out), 'scratch', False)
    for init_from, eval_only in [('resume', False), ('scratch', True), (str(out / 'ckpt.pt'), True)]:
        try:
            paths = prepare_out_dir(str(out), init_from, eval_only)
            assert paths == (str(out / 'log.jsonl'), str(out / 'ckpt.pt'))
            assert sorted(os.listdir(out)) == ['.lock', 'ckpt.pt']
        finally:
            train_utils._locks.pop().close()
    assert (out / 'ckpt.pt').read_bytes() == b'a checkpoint'


def test_a_new_run_moves_the_log_of_a_run_without_checkpoint_aside(tmp_path, capsys):
    """A run killed before its first checkpoint, started again: its log lines are kept in a file of their
    own instead of mixing with the new run's (both would have a step 10)."""
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"step": 10, "loss": 4.0}\n')
    try:
        log_file, _ = prepare_out_dir(str(out), 'scratch', False)
    finally:
        train_utils._locks.pop().close()
    assert not os.path.exists(log_file)
    kept = [p for p in os.listdir(out) if p.startswith('log.') and p != 'log.jsonl']
    assert len(kept) == 1 and (out / kept[0]).read_text() == '{"step": 10, "loss": 4.0}\n'
    assert re.fullmatch(r'log\.\d{8}-\d{6}\.jsonl', kept[0])  # when it was moved: two such logs never collide
    assert capsys.readouterr().err == (f'{log_file}: the log of an earlier run without a checkpoint, moved to '
                                       f'{out / kept[0]}\n')
    (out / 'log.jsonl').write_text('{"step": 20}\n')
    for init_from, eval_only in [('resume', False), ('scratch', True)]:  # a resumed or evaluated run's log stays
        try:
            prepare_out_dir(str(out), init_from, eval_only)
        finally:
            train_utils._locks.pop().close()
        assert (out / 'log.jsonl').read_text() == '{"step": 20}\n'


def test_resume_drops_the_log_lines_after_the_checkpoint(tmp_path):
    log = tmp_path / 'log.jsonl'
    log.write_text('{"params_M": 1}\n{"step": 5}\n{"step": 10}\n{"step": 15}\n{"epoch_end": 0, "step": 15}\n{"st')
    trim_log(str(log), 10)
    assert log.read_text() == '{"params_M": 1}\n{"step": 5}\n{"step": 10}\n'
    trim_log(str(log), 0)  # the run headers, without a step, stay whatever the step
    assert log.read_text() == '{"params_M": 1}\n'


HERE = Path(__file__).parent


def script_settings(script):
    """A training script's settings before any override: its source up to the configure() call, run."""
    source = (HERE / script).read_text()
    namespace = {}
    exec(compile(source[:source.index('\nconfig = configure(')], script, 'exec'), namespace)
    return {k: namespace[k] for k in config_keys(namespace)}


@pytest.mark.parametrize('path', sorted(p.name for p in (HERE / 'config').glob('*.py')))
def test_every_shipped_config_file_is_accepted_by_its_script(path):
    """The files in config/ name only settings their script has, with values of the right type, and
    pass the checks a run makes before it starts: a renamed setting cannot leave one behind."""
    script = 'train_cls.py' if path.startswith('imagenet_') or '_cls_' in path else 'train_clip.py'
    config = configure(script_settings(script), [str(HERE / 'config' / path)])
    check_settings(config)
    assert config != script_settings(script)  # the file was read: it changes something


def test_end_process_runs_the_exit_handlers_flushes_and_exits_with_its_code(tmp_path):
    """end_process (the end of a torchrun rank): the message on stderr, the atexit handlers run (the loader
    workers' end), buffered output flushed, the given exit code; nothing after it runs."""
    marker = tmp_path / 'handler_ran'
    code = ('import atexit, sys, train_utils\n'
            f'atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))\n'
            'print("buffered", end="")\n'
            'train_utils.end_process(3, "the reason")\n'
            'print("after")\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3 and proc.stdout == 'buffered' and 'the reason' in proc.stderr, proc.stderr[-2000:]
    assert marker.read_text() == 'ran'


@pytest.mark.parametrize('base, variant, differs', [
    ('cc12m_vit.py', 'cc12m_2x.py', {'out_dir', 'boundary', 'compression'}),
    ('cc12m_vit.py', 'cc12m_4x.py', {'out_dir', 'boundary'}),  # compression 4 is the default
    ('cc12m_vit.py', 'cc12m_10x.py', {'out_dir', 'boundary', 'compression'}),
    ('imagenet_linear_vit.py', 'imagenet_linear_10x.py',
     {'out_dir', 'boundary', 'compression', 'batch_size', 'warmup_steps', 'ckpt_interval'}),
    ('imagenet_finetune_vit.py', 'imagenet_finetune_10x.py',
     {'out_dir', 'boundary', 'compression', 'batch_size', 'warmup_steps', 'ckpt_interval'}),
])
def test_a_pooled_mission_config_is_its_plain_runs_recipe_plus_the_pooling(base, variant, differs):
    """config/cc12m_10x.py and the like run config/cc12m_vit.py's file and change only the pooling (and, for the
    ImageNet rows, the original's batch): the plain and the pooled run of a table share every other setting,
    the paths to set included."""
    script = 'train_cls.py' if base.startswith('imagenet_') else 'train_clip.py'
    plain, pooled = (run_settings(script, f'config/{name}') for name in (base, variant))
    assert {k for k in plain if plain[k] != pooled[k]} == differs
    assert pooled['boundary'] == 'gumbel' and plain['boundary'] == 'none' and '/path/to/' in str(pooled)
