"""End-to-end tests of train_cls.py on the built-in shapes folders, with a tiny model (config/shapes_cls_tiny.py)
or a small random OpenCLIP checkpoint standing in for a pretrained one."""
import os
import shutil
from collections import Counter

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision

import data
from conftest import (check_distortion_weight, check_job_wide_sigterm_with_workers, check_reinforce_run,
                      check_sigterm_loses_nothing, load_ckpt, records, run_preloaded, run_script, train_records)
from model import load_openclip
from train_utils import cosine_lr

TINY = 'config/shapes_cls_tiny.py'


def run(*args, torchrun=False, **kwargs):
    """train_cls.py with these arguments: as two torchrun ranks (run_script), or as one process forked from
    conftest's preloaded server (run_preloaded: the same run, without a fresh interpreter's ~5 s of imports)."""
    if torchrun:
        return run_script('train_cls.py', *args, torchrun=True, **kwargs)
    return run_preloaded('train_cls.py', *args, **kwargs)


def openclip_checkpoint(tmp_path):
    """A small random CLIP built by OpenCLIP itself (12 vision blocks of width 64, as the ViT-B-32 config
    asks, 16 patches of 16 px) and saved in OpenCLIP's layout: a stand-in for a pretrained checkpoint, every weight
    perturbed, so that a LayerNorm left at its initial weight 1 and bias 0 cannot hide a missing or swapped mapping.
    Returns it and the train_cls.py arguments that load it."""
    torch.manual_seed(0)
    ref = open_clip.CLIP(embed_dim=64, vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=12, head_width=32),
                         text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = str(tmp_path / 'openclip.pt')
    torch.save(ref.state_dict(), path)
    return ref, [f'--init_from={path}', "--vision={'image_size': 64, 'patch_size': 16, 'width': 64, 'heads': 2, "
                 "'embed_dim': 64}", "--text={'width': 64, 'heads': 2, 'layers': 2, 'context_length': 32}",
                 '--pre_layers=2', '--short_layers=10', '--batch_size=32']


@pytest.fixture(scope='module')
def logged_run(tmp_path_factory):
    """A 60-step run (one epoch) logging every 10 steps, and its epoch's log line with the validation."""
    out = str(tmp_path_factory.mktemp('logged') / 'run')
    run(TINY, f'--out_dir={out}', '--max_steps=60', '--log_interval=10', '--ckpt_interval=1000', '--lr=3e-3')
    return out, [r for r in records(out) if 'val_top1' in r]


def test_every_log_interval_is_logged(logged_run):
    out, _ = logged_run
    assert [r['step'] for r in train_records(out)] == [10, 20, 30, 40, 50, 60]


def test_loss_decreases(logged_run):
    logged = train_records(logged_run[0])
    assert logged[-1]['ce'] < logged[0]['ce'] - 0.8, [r['ce'] for r in logged]  # untrained, it wanders by ~0.3


def test_log_lines_hold_every_metric(logged_run):
    logged = train_records(logged_run[0])
    for key in ['epoch', 'loss', 'ce', 'boundary', 'compression', 'lr', 'step_time', 'data_time', 'samples_per_s',
                'mem_gb']:
        assert key in logged[0], key


def test_each_epoch_is_validated_once(logged_run):
    _, epoch = logged_run
    assert len(epoch) == 1 and epoch[0]['step'] == 60


def test_epoch_lines_hold_every_metric(logged_run):
    _, epoch = logged_run
    for key in ['train_loss', 'val_top1', 'val_top5', 'train_compression', 'eval_compression', 'avg_step_time',
                'peak_mem_gb', 'lr', 'colour_top1', 'shape_top1']:
        assert key in epoch[0], key


def test_validation_accuracy_is_a_percentage(logged_run):
    _, epoch = logged_run
    assert 0 <= epoch[0]['val_top1'] <= epoch[0]['val_top5'] <= 100


def test_compression_is_near_the_target(logged_run):
    _, epoch = logged_run
    assert 2.0 < epoch[0]['train_compression'] < 8.0 and epoch[0]['eval_compression'] == 4.0  # 16 patches, 4x


def test_epochs_log_their_efficiency_metrics(logged_run):
    _, epoch = logged_run
    assert epoch[0]['avg_step_time'] > 0 and epoch[0]['peak_mem_gb'] is None  # no memory statistics on CPU


def test_validation_saves_a_picture_of_the_segments(logged_run):
    out, _ = logged_run
    assert os.path.isfile(os.path.join(out, 'boundaries_60.png'))


@pytest.fixture(scope='module')
def zero_shot(tmp_path_factory):
    """A stand-in pretrained checkpoint (see openclip_checkpoint), the arguments that load it, and OpenCLIP's
    own zero-shot classifier of it on the shapes val set: the classifier, the images, their labels and logits."""
    tmp_path = tmp_path_factory.mktemp('zero_shot')
    ref, args = openclip_checkpoint(tmp_path)
    tokenizer = open_clip.get_tokenizer('ViT-B-32', context_length=32)
    classifier = open_clip.build_zero_shot_classifier(ref, tokenizer, data.SHAPES_CLASSNAMES, data.SHAPES_TEMPLATES)
    loader = data.folder_loader(data.make_shapes()['root'], 'val', data.image_transforms(64)[1], 250, workers=0)
    with torch.no_grad():
        images, labels = map(torch.cat, zip(*loader))
        expected = ref.logit_scale.exp() * ref.encode_image(images, normalize=True) @ classifier
    return dict(tmp_path=tmp_path, ref=ref, args=args, classifier=classifier, images=images, labels=labels,
                expected=expected)


def test_zeroshot_head_reproduces_the_zero_shot_classifier(zero_shot):
    """Untrained, the classifier IS CLIP's zero-shot classifier: the same top-1/top-5 on the val set.
    head_init='auto' picks 'zeroshot' for a checkpoint; boundary='none' is the OpenCLIP ViT exactly."""
    labels = zero_shot['labels']
    top5 = zero_shot['expected'].topk(5, dim=1).indices
    assert len(labels) == 1500
    evaluated = str(zero_shot['tmp_path'] / 'eval')
    run(*zero_shot['args'], '--boundary=none', '--eval_only=True', f'--out_dir={evaluated}')
    ours = records(evaluated)[-1]
    assert ours['val_top1'] == pytest.approx(100 * (top5[:, 0] == labels).float().mean().item())
    assert ours['val_top5'] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())


def test_zeroshot_head_gives_the_zero_shot_logits(zero_shot):
    """Per image, the untrained classifier's logits are CLIP's (its logit scale times the cosine similarities).
    One step at lr 0 (zero steps is refused): the checkpoint holds the initial classifier; its architecture
    comes back from model_args."""
    ref, expected = zero_shot['ref'], zero_shot['expected']
    initial = str(zero_shot['tmp_path'] / 'initial')
    run(*zero_shot['args'], '--boundary=none', '--max_steps=1', '--lr=0', f'--out_dir={initial}')
    ckpt = load_ckpt(initial)
    assert ckpt['step'] == 1 and ckpt['n_classes'] == 30
    visual = load_openclip(**ckpt['model_args']).visual.eval()
    visual.load_state_dict({k[7:]: v for k, v in ckpt['model'].items() if k.startswith('visual.')})
    with torch.no_grad():
        features = F.normalize(visual(zero_shot['images'])[0], dim=-1)
        logits = F.linear(features, ckpt['model']['head.weight'], ckpt['model']['head.bias'])
    assert torch.equal(ckpt['model']['head.bias'], torch.zeros(30))
    torch.testing.assert_close(ckpt['model']['head.weight'],
                               (ref.logit_scale.exp() * zero_shot['classifier'].T).detach())
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


@pytest.fixture(scope='module')
def finetune_start(tmp_path_factory):
    """One step of finetuning a stand-in pretrained checkpoint at lr 0: the initial weights (the seed fixes
    the new head and predictor) and the finetuning optimizer, whose pretrained weights train at lr *
    backbone_lr_scale. Returns the pretrained state dict, the arguments and that checkpoint."""
    tmp_path = tmp_path_factory.mktemp('finetune')
    ref, args = openclip_checkpoint(tmp_path)
    args += ['--boundary=gumbel', '--compression=4.0']
    initial = str(tmp_path / 'initial')
    run(*args, '--max_steps=1', '--lr=0', '--backbone_lr_scale=0.1', f'--out_dir={initial}')
    return ref.state_dict(), args, load_ckpt(initial)


def test_finetuning_trains_the_pretrained_weights_at_backbone_lr_scale(finetune_start):
    pretrained, _, before = finetune_start
    n_pretrained = len([k for k in pretrained if k.startswith('visual.')])
    n_params = Counter()
    for group in before['optimizer']['param_groups']:
        n_params[group['lr_scale']] += len(group['params'])
    assert n_params == {1.0: 8, 0.1: n_pretrained}  # 8: head and predictor weights and biases


def test_frozen_backbone_trains_only_the_head_and_predictor(tmp_path, finetune_start):
    pretrained, args, before = finetune_start
    n_pretrained = len([k for k in pretrained if k.startswith('visual.')])
    before = before['model']
    trained = str(tmp_path / 'trained')
    run(*args, '--freeze_backbone=True', '--max_steps=5', '--lr=1e-2', f'--out_dir={trained}')
    after = load_ckpt(trained)
    new = [k for k in after['model'] if k.startswith(('head.', 'visual.predictor.'))]
    assert len(new) == 8 and len(after['model']) == len(new) + n_pretrained
    for k, v in after['model'].items():
        if k in new:
            assert not torch.equal(v, before[k]), f'{k} did not train'
        else:  # bit-identical to the OpenCLIP weights
            assert torch.equal(v, pretrained[k]) and torch.equal(v, before[k]), f'{k} changed'
    assert len(after['optimizer']['state']) == len(new)  # nothing else was even handed to the optimizer
    assert [r for r in records(trained) if 'val_top1' in r][-1]['eval_compression'] == 4.0  # the predictor is used


SCHEDULE = ['--lr_decay_steps=20', '--lr=1e-3']  # the 10-step run's: a 20-step schedule, which a resume continues


@pytest.fixture(scope='module')
def ten_steps(tmp_path_factory):
    """The out_dir of a finished 10-step run (of a 20-step schedule): the run the resume tests continue, and the
    checkpoint refused resumes must leave as it was. One run for all of them; each test works on a copy."""
    out = str(tmp_path_factory.mktemp('ten') / 'run')
    run(TINY, f'--out_dir={out}', '--max_steps=10', *SCHEDULE)
    return out


@pytest.fixture(scope='module')
def resumed(tmp_path_factory, ten_steps):
    """The 10-step run's checkpoint (first), the one a resume with nothing left to do wrote (again), and
    those of a resume to step 20 (final), with the log (each resume on a copy of the run)."""
    again, final = (str(tmp_path_factory.mktemp('resumed') / name) for name in ('again', 'final'))
    for out, steps in ((again, 10), (final, 20)):
        shutil.copytree(ten_steps, out)
        run(TINY, f'--out_dir={out}', f'--max_steps={steps}', *SCHEDULE, '--init_from=resume')
    return dict(first=load_ckpt(ten_steps), again=load_ckpt(again), final=load_ckpt(final), logged=records(final))


def test_checkpoint_holds_the_training_state(resumed):
    first = resumed['first']
    assert first['step'] == 10 and set(first) >= {'model', 'optimizer', 'scaler', 'step', 'epoch', 'config',
                                                  'model_args', 'n_classes'}


def test_resume_with_nothing_left_to_do_writes_back_what_it_loaded(resumed):
    first, again = resumed['first'], resumed['again']
    for k, v in first['model'].items():
        assert torch.equal(v, again['model'][k]), k
    assert again['optimizer']['state'][0]['step'] == first['optimizer']['state'][0]['step'] == 10


def test_resume_continues_on_the_same_learning_rate_schedule(resumed):
    logged, first = resumed['logged'], resumed['first']
    marks = [r for r in logged if 'resume_step' in r]
    assert marks and marks[-1]['resume_step'] == 10 and marks[-1]['skipping_batches'] == 10
    after = [r for r in logged[logged.index(marks[-1]):] if 'loss' in r]
    assert [r['step'] for r in after] == [15, 20]
    assert after[0]['lr'] == pytest.approx(cosine_lr(14, 20, 5, 1e-3, 1e-5))
    final = resumed['final']
    assert final['step'] == 20 and final['optimizer']['state'][0]['step'] == 20
    assert not torch.equal(final['model']['head.weight'], first['model']['head.weight'])


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    """A 6-step run on two ranks."""
    out = str(tmp_path_factory.mktemp('ddp') / 'ddp')
    run(TINY, f'--out_dir={out}', '--max_steps=6', '--log_interval=3', torchrun=True)
    return out


def test_torchrun_two_ranks_stay_identical(ddp_run):
    sync = [r for r in records(ddp_run) if 'ranks_in_sync' in r]
    assert sync and sync[-1]['ranks_in_sync'] and len(sync[-1]['rank_checksums']) == 2


def test_torchrun_logs_one_run_of_two_ranks(ddp_run):
    assert [r['world_size'] for r in records(ddp_run) if 'world_size' in r] == [2]
    assert [r['step'] for r in train_records(ddp_run)] == [3, 6]


def test_missing_imagenet_fails_clearly(tmp_path):
    proc = run(TINY, f'--out_dir={tmp_path}', '--data_dir=/nonexistent/imagenet', check=False)
    assert proc.returncode != 0 and '/nonexistent/imagenet/train' in proc.stderr and 'n01440764' in proc.stderr
    assert 'Traceback' not in proc.stderr  # a message, not a crash


def test_zero_temperature_is_refused_up_front(tmp_path):
    """temperature=0 (a NaN loss, once) stops the run before it starts. Run by a fresh interpreter, python
    train_cls.py, as a user runs it: the refusal is one line on stderr, no traceback (the other refusals here run
    forked from conftest's preloaded server, which ends a script as the interpreter does)."""
    proc = run_script('train_cls.py', TINY, f'--out_dir={tmp_path}', '--temperature=0', check=False)
    assert proc.returncode != 0 and 'temperature=0.0: must be > 0' in proc.stderr and 'Traceback' not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if 'config error' in line]
    assert len(errors) == 1 and errors[0].startswith('config error: ')


def test_sigterm_saves_the_last_step_and_the_resumed_run_loses_nothing(tmp_path):
    check_sigterm_loses_nothing('train_cls.py', TINY, tmp_path, runner=run_preloaded)


@pytest.mark.parametrize('router', [None, {'min_segment': 3}], ids=['defaults', 'min_segment_3'])
def test_a_reinforce_run_trains_its_router_at_the_target_rate(tmp_path, router):
    """The default router (segments of at least 2 patches), and min_segment 3: the most the tiny run's 16 patches
    in 4 segments can be sure to give (judged on that geometry, not on 224 px, where it was refused)."""
    check_reinforce_run('train_cls.py', TINY, tmp_path, steps=6, router=router, runner=run_preloaded)


def test_the_distortion_weight_enters_the_routers_reward(tmp_path):
    check_distortion_weight('train_cls.py', TINY, tmp_path, runner=run_preloaded)


def test_resume_is_bit_exact(tmp_path, resumed):
    """Stopped at step 10 and resumed (resumed['final']), a run ends with the weights of one that never stopped:
    the random crops and the Gumbel noise after step 10 are the same draws."""
    straight = str(tmp_path / 'straight')
    # a fresh interpreter: its own str hash seed and random states, which the forked runs share with their server
    run_script('train_cls.py', TINY, f'--out_dir={straight}', '--max_steps=20', *SCHEDULE)
    a, b = load_ckpt(straight)['model'], resumed['final']['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_never_saves_nan_weights(tmp_path):
    out = str(tmp_path / 'run')
    proc = run(TINY, f'--out_dir={out}', '--lr=1000.0', '--boundary=none', '--ckpt_interval=1', '--log_interval=1000',
               check=False)
    assert proc.returncode != 0 and 'NaN or infinite' in proc.stderr and 'Traceback' not in proc.stderr
    saved = load_ckpt(out)
    assert all(v.isfinite().all() for v in saved['model'].values())


def test_no_silent_overwrite_and_no_conflicting_resume(tmp_path, ten_steps):
    out = str(tmp_path / 'run')
    shutil.copytree(ten_steps, out)  # a finished 10-step run
    proc = run(TINY, f'--out_dir={out}', '--max_steps=3', check=False)
    assert proc.returncode != 0 and 'init_from=resume' in proc.stderr and 'new --out_dir' in proc.stderr
    for arg in ['--freeze_backbone=True', '--batch_size=16', '--short_layers=2']:
        proc = run(TINY, f'--out_dir={out}', '--max_steps=20', '--init_from=resume', arg, check=False)
        assert proc.returncode != 0 and arg[2:].split('=')[0] + '=' in proc.stderr, arg
        assert 'Traceback' not in proc.stderr
    assert load_ckpt(out)['step'] == 10


def test_resume_on_other_class_folders_is_refused(tmp_path):
    """The checkpoint's head scores its run's classes: resumed on folders of other names, every label
    would silently mean another class."""
    shapes, root = data.make_shapes(), tmp_path / 'data'
    for split, n in (('train', 2), ('val', 1)):
        for c in sorted(os.listdir(shapes[split])):
            os.makedirs(root / split / c)
            for name in sorted(os.listdir(os.path.join(shapes[split], c)))[:n]:
                shutil.copy(os.path.join(shapes[split], c, name), root / split / c / name)
    out = str(tmp_path / 'run')
    run(TINY, f'--out_dir={out}', f'--data_dir={root}', '--max_steps=2')
    for split in ('train', 'val'):
        for c in os.listdir(root / split):
            os.rename(root / split / c, root / split / f'other_{c}')
    proc = run(TINY, f'--out_dir={out}', f'--data_dir={root}', '--max_steps=4', '--init_from=resume', check=False)
    assert proc.returncode != 0 and 'class folders' in proc.stderr and 'Traceback' not in proc.stderr
    assert load_ckpt(out)['step'] == 2


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    """A few images of each class of the shapes folders, and some files that are not images, in train/ and val/."""
    shapes = data.make_shapes()
    for split, n in (('train', 4), ('val', 1)):
        for c in sorted(os.listdir(shapes[split])):
            os.makedirs(tmp_path / split / c)
            for name in sorted(os.listdir(os.path.join(shapes[split], c)))[:n]:
                shutil.copy(os.path.join(shapes[split], c, name), tmp_path / split / c / name)
    for i, c in enumerate(sorted(os.listdir(tmp_path / 'train'))[:4]):
        (tmp_path / 'train' / c / f'broken{i}.jpg').write_bytes(b'not a jpeg')
    (tmp_path / 'val' / c / 'broken.jpg').write_bytes(b'\xff\xd8\xff truncated')
    out = str(tmp_path / 'run')
    run(TINY, f'--out_dir={out}', f'--data_dir={tmp_path}', '--max_steps=6', '--log_interval=3')
    logged = records(out)
    assert [r['step'] for r in logged if 'loss' in r] == [3, 6]  # 124 images, 3 batches of 32 an epoch
    # Training reads the first 3 x 32 of each epoch's shuffle of the 124 files (seed 0: torch.randperm seeded with
    # seed + epoch, as DistributedSampler on one rank): the broken files among them are the failed reads.
    paths = [p for p, _ in torchvision.datasets.ImageFolder(str(tmp_path / 'train'), allow_empty=True,
                                                             is_valid_file=lambda p: True).samples]
    assert len(paths) == 124
    broken = {i for i, p in enumerate(paths) if os.path.basename(p).startswith('broken')}
    assert len(broken) == 4
    read = [set(torch.randperm(124, generator=torch.Generator().manual_seed(epoch))[:96].tolist()) for epoch in (0, 1)]
    expected = [len(broken & read[0]), len(broken & read[0]) + len(broken & read[1])]
    assert [r['skipped'] for r in logged if 'loss' in r] == expected
    # Each validation counts the unreadable val images it skipped: the one broken file, once (the picture of the
    # segments reads the first batch again, which the count leaves out).
    assert [r['val_skipped'] for r in logged if 'val_top1' in r] == [1, 1]


def test_a_job_wide_sigterm_with_loader_workers_still_saves_the_last_step(tmp_path):
    """Two loader workers decoding the image folder, the signal reaching every process of the job."""
    check_job_wide_sigterm_with_workers('train_cls.py', TINY, tmp_path, runner=run_preloaded)


@pytest.mark.parametrize('pooling, new_in_tower', [(['--boundary=gumbel'], 'visual.predictor.'),
                                                   (['--boundary=router'], ('visual.predictor.',
                                                                            'visual.extent_embedding.')),
                                                   (['--boundary=none', '--tome_cost=0.7'], None)])
def test_a_probe_of_a_plain_checkpoint_moves_only_the_head_and_the_pooling(plain_checkpoint, tmp_path, pooling,
                                                                           new_in_tower):
    """docs/pretrained.md's stage (b): on this project's plain CLIP checkpoint with pooling inserted, a frozen run
    leaves every tower weight bit-identical while the zero-shot head and the new pooling weights train."""
    args = [TINY, f'--init_from={plain_checkpoint}', '--freeze_backbone=True', *pooling, '--lr=1e-2']
    run(*args, '--max_steps=1', '--lr=0', f'--out_dir={tmp_path / "initial"}')
    proc = run(*args, '--max_steps=5', f'--out_dir={tmp_path / "trained"}')
    pretrained = {k: v for k, v in torch.load(plain_checkpoint, weights_only=True)['model'].items()
                  if k.startswith('visual.')}
    initial, trained = load_ckpt(tmp_path / 'initial')['model'], load_ckpt(tmp_path / 'trained')['model']
    new = sorted(set(trained) - set(pretrained))
    assert [k for k in new if not k.startswith('head.')] == [k for k in new if new_in_tower and
                                                             k.startswith(new_in_tower)]
    assert {'head.weight', 'head.bias'} <= set(new) and (len(new) > 2) == bool(new_in_tower)
    for k, v in pretrained.items():
        assert torch.equal(trained[k], v), f'{k} changed'
    for k in new:
        assert not torch.equal(trained[k], initial[k]), f'{k} did not train'
    logged = [r for r in records(tmp_path / 'trained') if 'val_top1' in r][-1]
    if new_in_tower:  # the pooling is used
        assert logged['eval_compression'] == 4.0
    else:  # ToMe is: 17 tokens, 6 merged in the first block, 5 in the second (the printed schedule), 5 patches left
        assert 'ToMe: r=[6]*1+[5]*1 tokens merged per block' in proc.stdout and logged['eval_compression'] == 16 / 5
