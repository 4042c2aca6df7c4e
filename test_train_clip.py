"""End-to-end tests of train_clip.py on the built-in shapes data, with a tiny model (config/shapes_tiny.py)."""
import math
import os
import re
import shutil

import open_clip
import pytest
import torch

import data
from model import DTPConfig, load_openclip
from conftest import (check_distortion_weight, check_job_wide_sigterm_with_workers, check_reinforce_run,
                      check_sigterm_loses_nothing, load_ckpt, read_shard, records, run_preloaded, run_script,
                      terminate_mid_run, train_records, write_tar)
from train_utils import cosine_lr, tower_class

TINY = 'config/shapes_tiny.py'


def run(*args, torchrun=False, **kwargs):
    """train_clip.py with these arguments: as two torchrun ranks (run_script), or as one process forked from
    conftest's preloaded server (run_preloaded: the same run, without a fresh interpreter's ~5 s of imports)."""
    if torchrun:
        return run_script('train_clip.py', *args, torchrun=True, **kwargs)
    return run_preloaded('train_clip.py', *args, **kwargs)


@pytest.fixture(scope='module')
def logged_run(tmp_path_factory):
    """A 60-step run logging every 10 steps, with its final zero-shot evaluation."""
    out = str(tmp_path_factory.mktemp('logged') / 'run')
    run(TINY, f'--out_dir={out}', '--max_steps=60', '--log_interval=10', '--ckpt_interval=1000')
    return out


def test_every_log_interval_is_logged(logged_run):
    assert [r['step'] for r in train_records(logged_run)] == [10, 20, 30, 40, 50, 60]


def test_loss_decreases(logged_run):
    logged = train_records(logged_run)
    assert logged[-1]['contrastive'] < logged[0]['contrastive'] - 0.2, [r['contrastive'] for r in logged]


def test_log_lines_hold_every_metric(logged_run):
    """Every metric, with the value it must have: the loss is the contrastive loss plus the boundary prior
    (boundary_loss_weight 1), lr the schedule's at the step's last update (shapes_tiny: lr 2e-3, 5 warmup
    steps, 60 steps), epoch the share of the 1024 / 32 = 32 batches of an epoch, nothing skipped, no memory
    statistics on CPU."""
    logged = train_records(logged_run)
    for r in logged:
        assert set(r) == {'step', 'epoch', 'loss', 'contrastive', 'boundary', 'compression', 'lr', 'logit_scale',
                          'step_time', 'data_time', 'samples_per_s', 'mem_gb', 'skipped'}, r
        assert r['loss'] == pytest.approx(r['contrastive'] + r['boundary'], rel=1e-5, abs=1e-6)
        assert r['boundary'] > 0 and math.isfinite(r['loss'])
        assert r['lr'] == pytest.approx(cosine_lr(r['step'] - 1, 60, 5, 2e-3, 1e-5), rel=1e-12)
        assert r['epoch'] == r['step'] / 32 and r['skipped'] == 0 and r['mem_gb'] is None
        assert r['step_time'] > 0 and r['data_time'] >= 0 and r['samples_per_s'] > 0
        assert 1 <= r['logit_scale'] <= 100  # exp of the clamped log scale


def test_compression_is_near_the_target(logged_run):
    """Training logs the paper's Bernoulli samples, whose count varies: near the 4x target. Evaluation takes the
    top-k cuts, round(16 / 4) = 4 segments of every image's 16 patches: exactly 4x."""
    assert 2.0 < train_records(logged_run)[-1]['compression'] < 8.0
    assert [r for r in records(logged_run) if 'zeroshot_top1' in r][-1]['eval_compression'] == 16 / round(16 / 4)


def test_epochs_log_their_efficiency_metrics(logged_run):
    assert any('epoch_end' in r and 'avg_step_time' in r for r in records(logged_run))


def test_the_run_ends_with_a_zero_shot_evaluation(logged_run):
    """The final record's accuracies are those of the saved model, computed here independently of the script's
    evaluation: OpenCLIP's zero-shot classifier of the checkpoint, over the shapes val set in the same batches;
    colour_top1 and shape_top1 count the images whose top-1 class name has the right first word (the colour) or
    the right second word (the shape), read from the class names rather than from data.SHAPES_GROUPS."""
    final = [r for r in records(logged_run) if 'zeroshot_top1' in r]
    assert final and final[-1]['step'] == 60
    final = final[-1]
    assert 'color_gain' not in final  # routers.py's learned router only
    ckpt = load_ckpt(logged_run)
    assert ckpt['step'] == 60
    clip = load_openclip(**ckpt['model_args'])
    clip.load_state_dict(ckpt['model'])
    clip.eval()
    tokenizer = open_clip.get_tokenizer('ViT-B-32', context_length=clip.text.context_length)
    loader = data.folder_loader(data.shapes_paths()['root'], 'val', data.image_transforms(32)[1], batch_size=32,
                                workers=0)
    correct = dict(top1=0, top5=0, colour=0, shape=0)
    n = 0
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(clip, tokenizer, data.SHAPES_CLASSNAMES,
                                                          data.SHAPES_TEMPLATES)
        for images, labels in loader:
            top5 = (torch.nn.functional.normalize(clip.visual(images)[0], dim=-1) @ classifier).topk(5, dim=1).indices
            correct['top1'] += (top5[:, 0] == labels).sum().item()
            correct['top5'] += (top5 == labels[:, None]).any(1).sum().item()
            for guess, label in zip(top5[:, 0].tolist(), labels.tolist()):
                colour, shape = data.SHAPES_CLASSNAMES[guess].split()
                correct['colour'] += data.SHAPES_CLASSNAMES[label].startswith(colour + ' ')
                correct['shape'] += data.SHAPES_CLASSNAMES[label].endswith(' ' + shape)
            n += len(labels)
    assert n == 1500
    assert (final['zeroshot_top1'], final['zeroshot_top5'], final['colour_top1'], final['shape_top1']) == tuple(
        100 * correct[k] / n for k in ('top1', 'top5', 'colour', 'shape'))


def test_evaluation_saves_a_picture_of_the_segments(logged_run):
    assert os.path.isfile(os.path.join(logged_run, 'boundaries_60.png'))


SCHEDULE = ['--lr_decay_steps=20', '--lr=1e-3']  # the 10-step run's: a 20-step schedule, which a resume continues


@pytest.fixture(scope='module')
def ten_steps(tmp_path_factory):
    """The out_dir of a finished 10-step run (of a 20-step schedule), with its final zero-shot evaluation: the run
    the resume tests continue, the checkpoint the init_from tests start from, and the one refused resumes must leave
    as it was. One run for all of them; a test that would change it works on a copy."""
    out = str(tmp_path_factory.mktemp('ten') / 'run')
    run(TINY, f'--out_dir={out}', '--max_steps=10', *SCHEDULE)
    return out


@pytest.fixture(scope='module')
def resumed(tmp_path_factory, ten_steps):
    """The 10-step run's checkpoint (first), the one a resume with nothing left to do wrote (again), and
    those of a resume to step 20 (final), with the log and the out_dir (each resume on a copy of the run)."""
    again, final = (str(tmp_path_factory.mktemp('resumed') / name) for name in ('again', 'final'))
    for out, steps in ((again, 10), (final, 20)):
        shutil.copytree(ten_steps, out)
        run(TINY, f'--out_dir={out}', f'--max_steps={steps}', *SCHEDULE, '--init_from=resume')
    return dict(first=load_ckpt(ten_steps), again=load_ckpt(again), final=load_ckpt(final), logged=records(final),
                out_dir=final)


def test_checkpoint_holds_the_training_state(resumed):
    first = resumed['first']
    assert first['step'] == 10 and set(first) >= {'model', 'optimizer', 'scaler', 'step', 'epoch', 'config'}


def test_resume_with_nothing_left_to_do_writes_back_what_it_loaded(resumed):
    first, again = resumed['first'], resumed['again']
    for k, v in first['model'].items():
        assert torch.equal(v, again['model'][k]), k
    assert again['optimizer']['state'][0]['step'] == first['optimizer']['state'][0]['step'] == 10


def test_resume_continues_on_the_same_learning_rate_schedule(resumed):
    logged = resumed['logged']
    marks = [r for r in logged if 'resume_step' in r]
    assert marks and marks[-1]['resume_step'] == 10
    after = [r for r in logged[logged.index(marks[-1]):] if 'loss' in r]
    assert [r['step'] for r in after] == [15, 20]
    assert after[0]['lr'] == pytest.approx(cosine_lr(14, 20, 5, 1e-3, 1e-5))
    final = resumed['final']
    assert final['step'] == 20 and final['optimizer']['state'][0]['step'] == 20


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    """Two ranks streaming the shapes shards through the webdataset loader: CC12M's path (the other
    tests train from memory, as the 'shapes' default does)."""
    out = str(tmp_path_factory.mktemp('ddp') / 'ddp')
    run(TINY, f'--out_dir={out}', '--max_steps=6', '--log_interval=3', f"--train_data={data.make_shapes()['shards']}",
        '--train_num_samples=640', '--workers=1', torchrun=True)
    return out


def test_torchrun_two_ranks_stay_identical(ddp_run):
    sync = [r for r in records(ddp_run) if 'ranks_in_sync' in r]
    assert sync and sync[-1]['ranks_in_sync'] and len(sync[-1]['rank_checksums']) == 2


def test_torchrun_self_critical_reinforce_keeps_the_ranks_identical(tmp_path):
    """routers.py's router (self-critical REINFORCE) under DDP: the baseline pass's features are gathered across
    ranks for the rewards, and both ranks' routers still end identical (and moved)."""
    out = str(tmp_path / 'ddp')
    run(TINY, f'--out_dir={out}', '--max_steps=4', '--log_interval=2', '--boundary=router', torchrun=True)
    sync = [r for r in records(out) if 'ranks_in_sync' in r]
    assert sync and sync[-1]['ranks_in_sync'] and len(sync[-1]['rank_checksums']) == 2
    assert all(math.isfinite(r['reinforce']) for r in train_records(out))
    assert load_ckpt(out)['model']['visual.predictor.3.weight'].any()  # zero at the start


def test_torchrun_sigterm_stops_both_ranks_after_one_step_and_resumes(tmp_path):
    """SIGTERM to torchrun, which passes it on to both ranks: they agree on the step to stop after, save it,
    leave the process group together and exit with the message (no abort at exit); two ranks resume from it."""
    out = str(tmp_path / 'run')
    proc = terminate_mid_run('train_clip.py', out, TINY, '--max_steps=100000', '--ckpt_interval=1000', torchrun=True)
    assert proc.returncode != 0 and 'stopped by SIGTERM after step' in proc.stderr_text, proc.stderr_text[-2000:]
    assert 'terminate called' not in proc.stderr_text and 'SIGABRT' not in proc.stderr_text
    ckpt = load_ckpt(out)
    assert ckpt['world_size'] == 2 and ckpt['step'] >= 3 and ckpt['step'] == train_records(out)[-1]['step']
    assert records(out)[-1] == dict(step=ckpt['step'], stopped_by='SIGTERM')
    run(TINY, f'--out_dir={out}', f'--max_steps={ckpt["step"] + 2}', '--init_from=resume', torchrun=True)
    assert train_records(out)[-1]['step'] == ckpt['step'] + 2 and records(out)[-1]['ranks_in_sync']


def test_torchrun_ranks_share_the_epoch(ddp_run):
    start = [r for r in records(ddp_run) if 'world_size' in r][0]
    assert start['world_size'] == 2
    assert [r['step'] for r in train_records(ddp_run)] == [3, 6]
    assert start['steps_per_epoch'] == 10  # 640 samples / (32 per rank x 2 ranks)
    assert load_ckpt(ddp_run)['world_size'] == 2  # what a resume must run on (checked by init_model)


def test_eval_only_reproduces_openclip_zero_shot(tmp_path):
    """An OpenCLIP checkpoint evaluated with boundary='none' gives OpenCLIP's own zero-shot numbers.
    (A random ViT-B-32 at 32 px, one patch, so that 1500 validation images take seconds: the text tower's 180
    prompts cost as much again, in the script and here. Every weight perturbed, so that a LayerNorm left at its
    initial weight 1 and bias 0 cannot hide a missing or swapped mapping; the order of a grid of patches is
    test_model.py's, at 224 px.)"""
    torch.manual_seed(0)
    ref = open_clip.create_model('ViT-B-32', force_image_size=32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = str(tmp_path / 'openclip.pt')
    torch.save(ref.state_dict(), ckpt)
    out = str(tmp_path / 'eval')
    proc = run(f'--out_dir={out}', f'--init_from={ckpt}', '--eval_only=True', '--boundary=none', '--vision=None',
               "--vision={'image_size': 32}", '--text=None', '--pre_layers=2', '--short_layers=10', '--workers=0')
    assert 'zeroshot_top1' in proc.stdout and 'zeroshot_top5' in proc.stdout
    ours = [r for r in records(out) if 'zeroshot_top1' in r][-1]

    shapes = data.shapes_paths()
    loader = data.folder_loader(shapes['root'], 'val', data.image_transforms(32)[1], batch_size=128, workers=0)
    tokenizer = open_clip.get_tokenizer('ViT-B-32')
    classifier = open_clip.build_zero_shot_classifier(ref, tokenizer, data.SHAPES_CLASSNAMES, data.SHAPES_TEMPLATES)
    correct1 = correct5 = n = 0
    with torch.no_grad():
        for images, labels in loader:
            top5 = (ref.encode_image(images, normalize=True) @ classifier).topk(5, dim=1).indices
            correct1 += (top5[:, 0] == labels).sum().item()
            correct5 += (top5 == labels[:, None]).any(1).sum().item()
            n += len(labels)
    assert n == 1500
    assert ours['zeroshot_top1'] == pytest.approx(100 * correct1 / n)
    assert ours['zeroshot_top5'] == pytest.approx(100 * correct5 / n)


@pytest.mark.parametrize('args, expected', [
    (['--compresion=8'], ["unknown key 'compresion'; did you mean 'compression'"]),
    (['--batch_size=large'], ['batch_size', 'expected a int']),
    (["--train_data=/nonexistent/cc12m/{00000..00009}.tar", '--train_num_samples=1000'],
     ['/nonexistent/cc12m/00000.tar', 'img2dataset']),
    (["--imagenet_val=/nonexistent/imagenet/val"], ['/nonexistent/imagenet/val', 'n01440764']),
], ids=['unknown_key', 'wrong_type', 'missing_shards', 'missing_imagenet_val'])
def test_bad_config_and_missing_data_fail_clearly(tmp_path, args, expected):
    proc = run(TINY, f'--out_dir={tmp_path}', *args, check=False)
    assert proc.returncode != 0 and all(e in proc.stderr for e in expected)


def test_a_dtp_setting_inside_vision_is_refused(tmp_path):
    """One entry point per setting: a DTP setting inside vision is refused, not silently overridden. Run by a
    fresh interpreter, python train_clip.py, as a user runs it: the refusal is one line on stderr, no traceback
    (the other refusals here run forked from conftest's preloaded server, which ends a script as the interpreter
    does)."""
    proc = run_script('train_clip.py', TINY, f'--out_dir={tmp_path}', "--vision={'compression': 10.0}", check=False)
    assert proc.returncode != 0 and "vision['compression']" in proc.stderr and '--compression=' in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if 'config error' in line]
    assert 'Traceback' not in proc.stderr and len(errors) == 1 and errors[0].startswith('config error: ')


@pytest.mark.parametrize('args, names', [
    (['--boundary=fixed', "--router={'min_segment': 2}"], ['min_segment', "boundary='fixed'"]),
    (['--boundary=color', "--router={'noise': 3.0}"], ["router['noise']", "boundary='router' only"]),
    (['--boundary=color', '--eval_boundaries=threshold'], ["eval_boundaries='threshold'", "'color'"]),
    (['--boundary=none', "--router={'size_attention': True}"], ['size_attention', "boundary='none'"]),
    (['--boundary=router', "--router={'min_segment': 4}"], ["router['min_segment']=4", '4 segments of 16 patches']),
], ids=['router_dict_with_fixed', 'learned_setting_with_color', 'threshold_with_color', 'router_dict_with_none',
        'min_segment_beyond_the_geometry'])
def test_settings_that_do_not_apply_are_refused_in_one_line(tmp_path, args, names):
    """A setting the run's tower would ignore (or could not honour on the run's geometry: 16 patches, 4 segments)
    stops the run before it starts, with one line naming it."""
    proc = run(TINY, f'--out_dir={tmp_path / "run"}', *args, check=False)
    errors = [line for line in proc.stderr.splitlines() if 'config error' in line]
    assert proc.returncode != 0 and len(errors) == 1 and errors[0].startswith('config error: '), proc.stderr[-2000:]
    assert all(name in errors[0] for name in names), errors[0]
    assert 'Traceback' not in proc.stderr and not os.path.exists(tmp_path / 'run')


def test_short_layers_none_builds_the_architectures_depth(pairs_first):
    """--short_layers=None (documented: the architecture's depth minus pre_layers) runs: ViT-B-32's 12 blocks,
    1 before pooling (shapes_tiny's pre_layers) and 11 after; it used to be refused as a wrong type. (The run of
    pairs_first, given --short_layers=None after the config file, which sets 1.)"""
    import train_utils
    ckpt = pairs_first
    blocks = {k.split('.')[3] for k in ckpt['model'] if k.startswith('visual.transformer.resblocks.')}
    assert len(blocks) == 12 and ckpt['config']['short_layers'] is None
    cfg = train_utils.load_model(ckpt['model_args']).visual.cfg
    assert (cfg.pre_layers, cfg.short_layers) == (1, 11)


def test_resume_refuses_other_router_settings(router_run):
    """`router` is architecture: a router run (the demo's, router=None) resumed with other router settings is
    refused, naming it."""
    proc = run(ROUTER_DEMO, TINY, f'--out_dir={router_run}', '--max_steps=8', '--init_from=resume',
               "--router={'min_segment': 3}", check=False)
    assert proc.returncode != 0 and "router={'min_segment': 3} (checkpoint: None)" in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and load_ckpt(router_run)['step'] == 4


def test_an_unreadable_checkpoint_to_resume_is_named(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'')  # e.g. a disk that filled up
    proc = run(TINY, f'--out_dir={out}', '--init_from=resume', check=False)
    assert proc.returncode != 0 and f'{out}/ckpt.pt is not a readable checkpoint' in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


def test_an_init_from_that_is_no_checkpoint_is_named(tmp_path):
    notes = tmp_path / 'weights.bin'
    notes.write_text('download the weights from the wiki\n')
    proc = run(TINY, f'--out_dir={tmp_path / "other"}', f'--init_from={notes}', check=False)
    assert proc.returncode != 0 and f'{notes} is not a readable checkpoint' in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


@pytest.fixture(scope='module')
def finished_run(ten_steps):
    """A finished 10-step run (ten_steps): its ckpt.pt and its final zero-shot log line."""
    return os.path.join(ten_steps, 'ckpt.pt'), [r for r in records(ten_steps) if 'zeroshot_top1' in r][-1]


def test_own_checkpoint_as_init_from(tmp_path, finished_run):
    """A finished run's ckpt.pt as init_from (not 'resume'): its weights, so eval_only reproduces the run's
    final zero-shot numbers."""
    ckpt, final = finished_run
    again = str(tmp_path / 'again')
    run(TINY, f'--out_dir={again}', f'--init_from={ckpt}', '--eval_only=True')
    assert [r for r in records(again) if 'zeroshot_top1' in r][-1]['zeroshot_top1'] == final['zeroshot_top1']


def test_own_checkpoint_as_the_zero_shot_head_of_train_cls(tmp_path, finished_run):
    """The same ckpt.pt as init_from of train_cls.py: its zero-shot head scores what the run scored."""
    ckpt, final = finished_run
    cls = str(tmp_path / 'cls')
    proc = run_preloaded('train_cls.py', 'config/shapes_cls_tiny.py', f'--out_dir={cls}', f'--init_from={ckpt}',
                         '--eval_only=True', check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r for r in records(cls) if 'val_top1' in r][-1]['val_top1'] == pytest.approx(final['zeroshot_top1'])


def test_own_checkpoint_with_other_settings_is_refused(tmp_path, finished_run):
    ckpt, _ = finished_run
    proc = run(TINY, f'--out_dir={tmp_path / "again"}', f'--init_from={ckpt}', '--eval_only=True', '--short_layers=2',
               check=False)
    assert proc.returncode != 0 and "init_from='resume'" in proc.stderr and 'Traceback' not in proc.stderr


@pytest.fixture(scope='module')
def pairs_first(tmp_path_factory):
    """The checkpoint of a run given --vision and --max_steps before the config file (and --short_layers=None after
    it, for test_short_layers_none_builds_the_architectures_depth: one run for both)."""
    out = str(tmp_path_factory.mktemp('pairs') / 'run')
    run("--vision={'image_size': 48}", '--max_steps=2', TINY, f'--out_dir={out}', '--log_interval=1',
        '--short_layers=None')
    return load_ckpt(out)


def test_command_line_pairs_win_over_files(pairs_first):
    """Pairs placed before the config file still override it."""
    assert pairs_first['step'] == 2  # not the file's max_steps=20


def test_command_line_vision_merges_into_the_files(pairs_first):
    """--vision changes only the keys it names (replaced, it used to give the 224 px, width-768 ViT-B-32 tower)."""
    args = pairs_first['model_args']
    assert (args['image_size'], args['patch_size'], args['width'], args['predictor_hidden']) == (48, 8, 32, 32)


@pytest.fixture(scope='module')
def good_samples():
    """The samples of the first shapes shard, sorted by key: [(key, {ext: bytes})]."""
    return sorted(read_shard(data.expand_urls(data.make_shapes()['shards'])[0]).items())


def test_short_epochs_end_and_a_run_without_batches_stops(tmp_path, good_samples):
    """An epoch that yields fewer batches than promised ends and training moves on; one that yields none
    stops the run with a message naming the shards (it used to re-enter the epoch forever)."""
    good = good_samples
    (tmp_path / 'empty.tar').write_bytes(b'')
    proc = run(TINY, f'--out_dir={tmp_path / "a"}', f'--train_data={tmp_path / "empty.tar"}',
               '--train_num_samples=192', check=False, timeout=120)
    assert proc.returncode != 0 and 'no batch' in proc.stderr and 'empty.tar' in proc.stderr
    assert 'Traceback' not in proc.stderr

    # two shards of 64 samples, 7 of each corrupt: 114 good ones, not one batch of 128
    bad = [(k, dict(s, jpg=b'not a jpeg')) if i % 9 == 0 else (k, s) for i, (k, s) in enumerate(good[:128])]
    write_tar(tmp_path / 'c0.tar', bad[:64])
    write_tar(tmp_path / 'c1.tar', bad[64:])
    proc = run(TINY, f'--out_dir={tmp_path / "b"}', f'--train_data={tmp_path}/c{{0..1}}.tar', '--batch_size=128',
               '--train_num_samples=128', check=False, timeout=120)
    assert proc.returncode != 0 and 'no batch' in proc.stderr and 'c{0..1}.tar' in proc.stderr

    # one good shard and one zero-byte shard, a worker each: every epoch is half as long as promised
    write_tar(tmp_path / 'g0.tar', good[:200])
    (tmp_path / 'g1.tar').write_bytes(b'')
    out = str(tmp_path / 'c')
    proc = run(TINY, f'--out_dir={out}', f'--train_data={tmp_path}/g{{0..1}}.tar', '--train_num_samples=192',
               '--workers=2', '--max_steps=9', '--log_interval=3', timeout=120)
    assert 'g1.tar' in proc.stderr  # the warning names the bad shard
    short = [r for r in records(out) if 'short_epoch' in r]
    assert [(r['short_epoch'], r['step'], r['batches'], r['expected_batches']) for r in short] == [
        (0, 3, 3, 6), (1, 6, 3, 6)]
    assert short[0]['samples_short'] == 96  # 3 batches of 32
    assert [r['step'] for r in train_records(out)] == [3, 6, 9]
    ckpt = load_ckpt(out)
    assert ckpt['step'] == 9 and ckpt['epoch'] == 2


def test_torchrun_rank_without_batches_stops_every_rank(tmp_path, good_samples):
    """Two ranks, one good shard and one empty: the rank with data must not wait for the other forever."""
    good = good_samples
    write_tar(tmp_path / 's0.tar', good[:100])
    (tmp_path / 's1.tar').write_bytes(b'')
    proc = run(TINY, f'--out_dir={tmp_path / "run"}', f'--train_data={tmp_path}/s{{0..1}}.tar',
               '--train_num_samples=128', '--workers=1', torchrun=True, check=False, timeout=180)
    assert proc.returncode != 0 and proc.stderr.count('yielded no batch') == 2  # both ranks, one message each


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, ten_steps):
    out = str(tmp_path / 'run')
    shutil.copytree(ten_steps, out)  # a finished 10-step run
    good = load_ckpt(out)
    proc = run(TINY, f'--out_dir={out}', '--max_steps=20', '--init_from=resume', '--lr=1e30', '--grad_clip=0.0',
               check=False)
    assert proc.returncode != 0 and 'NaN or infinite' in proc.stderr and 'is left as it was' in proc.stderr
    assert 'Traceback' not in proc.stderr
    kept = load_ckpt(out)
    assert kept['step'] == 10 and all(torch.equal(v, kept['model'][k]) for k, v in good['model'].items())


def test_divergence_never_saves_nan_weights(tmp_path):
    """A checkpoint every step and a log line never: the check at save time keeps NaN weights out. (The
    plain tower at lr=1000 runs a few finite steps, then its weights go NaN without a forward crashing.)"""
    out = str(tmp_path / 'every_step')
    proc = run(TINY, f'--out_dir={out}', '--boundary=none', '--lr=1000.0', '--grad_clip=0.0', '--ckpt_interval=1',
               '--log_interval=1000', check=False)
    assert proc.returncode != 0 and 'NaN or infinite' in proc.stderr and 'Traceback' not in proc.stderr
    saved = load_ckpt(out)  # the last good step's
    assert 0 < saved['step'] < 20 and all(v.isfinite().all() for v in saved['model'].values() if v.is_floating_point())


# The tests below start runs on the finished 10-step run (ten_steps) that are refused and change nothing.

def test_a_new_run_never_replaces_a_checkpoint(ten_steps):
    proc = run(TINY, f'--out_dir={ten_steps}', '--max_steps=3', check=False)
    assert proc.returncode != 0 and "init_from=resume" in proc.stderr and 'out_dir' in proc.stderr
    assert load_ckpt(ten_steps)['step'] == 10


@pytest.mark.parametrize('arg', ['--pre_layers=2', '--boundary=none', '--compression=2.0',
                                 "--vision={'image_size': 64}", '--batch_size=16', '--seed=1',
                                 '--train_num_samples=256'])
def test_resume_refuses_conflicting_settings(ten_steps, arg):
    proc = run(TINY, f'--out_dir={ten_steps}', '--max_steps=20', '--init_from=resume', arg, check=False)
    key = arg[2:].split('=')[0]
    assert proc.returncode != 0 and f"{key}=" in proc.stderr and 'checkpoint' in proc.stderr, arg
    assert 'Traceback' not in proc.stderr


def test_the_other_scripts_checkpoint_is_not_resumed(tmp_path, ten_steps):
    out = str(tmp_path / 'run')
    shutil.copytree(ten_steps, out)
    proc = run_preloaded('train_cls.py', 'config/shapes_cls_tiny.py', f'--out_dir={out}', '--init_from=resume',
                         '--max_steps=20', check=False)
    assert proc.returncode != 0 and 'was written by train_clip.py, not train_cls.py' in proc.stderr
    assert 'Traceback' not in proc.stderr and load_ckpt(out)['step'] == 10


def test_resume_on_another_number_of_ranks_is_refused(tmp_path, ten_steps):
    """The global batch, the epoch's length and the batches skipped to reach the checkpoint's place all
    depend on the number of ranks: training goes on only on as many as the checkpoint was trained on."""
    out = str(tmp_path / 'run')
    shutil.copytree(ten_steps, out)
    ckpt = load_ckpt(out)
    assert ckpt['world_size'] == 1
    torch.save(dict(ckpt, world_size=2), os.path.join(out, 'ckpt.pt'))  # as if two torchrun ranks had written it
    proc = run(TINY, f'--out_dir={out}', '--max_steps=20', '--init_from=resume', check=False)
    assert proc.returncode != 0 and 'trained on 2 processes, this run has 1' in proc.stderr
    assert 'Traceback' not in proc.stderr and load_ckpt(out)['step'] == 10
    # evaluation reads the weights only: any number of ranks may do it
    run(TINY, f'--out_dir={out}', '--init_from=resume', '--eval_only=True')
    assert 'zeroshot_top1' in records(out)[-1]


def test_too_few_shards_for_the_workers_is_a_config_error(tmp_path):
    shard = sorted(data.expand_urls(data.make_shapes()['shards']))[0]
    proc = run(TINY, f'--out_dir={tmp_path / "run"}', f'--train_data={shard}', '--train_num_samples=64',
               '--workers=2', '--max_steps=2', check=False)
    assert proc.returncode != 0 and 'cannot be split over 1 ranks x 2 workers' in proc.stderr
    assert 'fewer workers' in proc.stderr and 'Traceback' not in proc.stderr


def test_resume_may_change_what_is_not_architecture(tmp_path, ten_steps):
    out = str(tmp_path / 'run')
    shutil.copytree(ten_steps, out)
    run(TINY, f'--out_dir={out}', '--max_steps=12', '--init_from=resume', '--lr=2e-3')  # not architecture: fine
    assert load_ckpt(out)['step'] == 12


def test_sigterm_saves_the_last_step_and_the_resumed_run_loses_nothing(tmp_path):
    check_sigterm_loses_nothing('train_clip.py', TINY, tmp_path, runner=run_preloaded)


@pytest.mark.parametrize('router', [None, {'min_segment': 3}], ids=['defaults', 'min_segment_3'])
def test_a_reinforce_run_trains_its_router_at_the_target_rate(tmp_path, router):
    """The default router (segments of at least 2 patches), and min_segment 3: the most the tiny run's 16 patches
    in 4 segments can be sure to give (judged on that geometry, not on 224 px, where it was refused)."""
    check_reinforce_run('train_clip.py', TINY, tmp_path, steps=10, router=router, runner=run_preloaded)


ROUTER_DEMO = 'config/shapes_router4x.py'


@pytest.fixture(scope='module')
def router_run(tmp_path_factory):
    """The out_dir of a 4-step run of the demo config (config/shapes_router4x.py) at the tiny size (refused
    resumes read it too, and change nothing)."""
    out = str(tmp_path_factory.mktemp('router') / 'run')
    run(ROUTER_DEMO, TINY, f'--out_dir={out}', '--max_steps=4', '--log_interval=2')
    return out


def test_the_demos_router_trains_and_evaluates_on_segments_of_at_least_two_patches(router_run):
    """The demo config (config/shapes_router4x.py) at the tiny size: its rule reaches the model with RouterConfig's
    defaults, training cuts exactly the target count, and the trained model's evaluation cuts keep every segment
    at least min_segment = 2 patches long."""
    import routers
    out = router_run
    ckpt = load_ckpt(out)
    assert (ckpt['config']['boundary'], ckpt['config']['router']) == ('router', None)
    assert all(r['compression'] == 4.0 and math.isfinite(r['reinforce']) for r in train_records(out))
    assert 'color_gain' in [r for r in records(out) if 'zeroshot_top1' in r][-1]
    clip = load_openclip(**ckpt['model_args'], tower=routers.RouterViT)
    clip.load_state_dict(ckpt['model'])
    cfg = clip.visual.cfg
    assert (cfg.boundary, cfg.min_segment, cfg.color_prior, cfg.noise, cfg.distortion_weight, cfg.lr_scale,
            cfg.size_attention) == ('router', 2, 4.0, 2.0, 3.0, 10.0, False)
    torch.manual_seed(0)
    with torch.no_grad():
        aux = clip.visual.eval()(torch.randn(8, 3, 32, 32))[1]
    assert aux['n_segments'].eq(4).all() and aux['segment_sizes'].min() >= 2  # 16 patches: 4 segments, none of 1


def test_threshold_evaluation_of_a_router_run_calibrates_to_the_target_mean_count(router_run, tmp_path):
    """eval_only with eval_boundaries='threshold' on the demo router's run: the threshold it logs is the one that
    gives the val images the target mean count (their compression 4.0), and it gives each image its own count."""
    import routers
    out = str(tmp_path / 'eval')
    run(ROUTER_DEMO, TINY, f'--out_dir={out}', f'--init_from={router_run}/ckpt.pt', '--eval_only=True',
        '--eval_boundaries=threshold')
    result = records(out)[-1]
    assert result['eval_compression'] == pytest.approx(4.0, abs=0.01) and 'cut_threshold' in result
    ckpt = load_ckpt(router_run)
    clip = load_openclip(**ckpt['model_args'], tower=routers.RouterViT)
    clip.load_state_dict(ckpt['model'])
    val = data.folder_loader(data.shapes_root('colour'), 'val', data.image_transforms(32)[1], 300).dataset
    images = torch.stack([val[i][0] for i in range(0, len(val), 5)])
    with torch.no_grad():
        aux = clip.visual.eval()(images)[1]
        counts = routers.threshold_cuts(aux['boundary_logits'], result['cut_threshold'], 2).sum(1)
    assert counts.min() < counts.max()  # per image, not 4 for all


def test_the_distortion_weight_enters_the_routers_reward(tmp_path):
    check_distortion_weight('train_clip.py', TINY, tmp_path, runner=run_preloaded)


def test_a_color_prior_run_logs_the_gain_it_learned(tmp_path):
    """The router's colour gain (router color_prior: where it starts) is a trained weight, and the zero-shot record
    logs where it is."""
    out = str(tmp_path / 'run')
    run(TINY, f'--out_dir={out}', '--max_steps=6', '--log_interval=2', '--boundary=router',
        "--router={'color_prior': 2.0}")
    gain = load_ckpt(out)['model']['visual.predictor.color_gain'].item()
    final = [r for r in records(out) if 'zeroshot_top1' in r][-1]
    assert final['color_gain'] == pytest.approx(gain) and gain != 2.0
    assert all(r['compression'] == 4.0 for r in train_records(out))


def test_resume_is_bit_exact(tmp_path, resumed):
    """Stopped at step 10 and resumed (resumed['final']), a run ends with the weights of one that never stopped:
    the Gumbel noise after step 10 is the same draws."""
    straight = str(tmp_path / 'straight')
    # a fresh interpreter: its own str hash seed and random states, which the forked runs share with their server
    run_script('train_clip.py', TINY, f'--out_dir={straight}', '--max_steps=20', *SCHEDULE)
    a, b = load_ckpt(straight)['model'], resumed['final']['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_logs_each_step_once(tmp_path, ten_steps, resumed):
    """A run killed after logging step 15 with its checkpoint at step 10: resumed, it logs 15 again."""
    out = str(tmp_path / 'run')
    shutil.copytree(resumed['out_dir'], out)  # 10 steps, then resumed to step 20
    shutil.copy(os.path.join(ten_steps, 'ckpt.pt'), os.path.join(out, 'ckpt.pt'))  # as if killed before saving 20
    run(TINY, f'--out_dir={out}', '--max_steps=20', *SCHEDULE, '--init_from=resume')
    assert [r['step'] for r in train_records(out)] == [5, 10, 15, 20]
    assert [r['resume_step'] for r in records(out) if 'resume_step' in r] == [10, 10]  # each resume is marked


def test_imagenet_val_must_hold_the_1000_classes(tmp_path):
    """A 3-class folder used to be scored against ImageNet's names: 0% and exit 0."""
    for c in ('n01440764', 'n01443537', 'n01484850'):
        (tmp_path / 'val' / c).mkdir(parents=True)
        shutil.copy(next(iter(sorted(data.Path(data.make_shapes()['val']).rglob('*.jpg')))), tmp_path / 'val' / c)
    proc = run(TINY, f'--out_dir={tmp_path / "run"}', f'--imagenet_val={tmp_path / "val"}', check=False)
    assert proc.returncode != 0 and 'has 3 class folders' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.fixture(scope='module')
def tome_run(tmp_path_factory):
    """The out_dir of a 2-step ToMe run (plain tower, tome_r=2)."""
    out = str(tmp_path_factory.mktemp('tome') / 'run')
    run(TINY, f'--out_dir={out}', '--max_steps=2', '--log_interval=1', '--boundary=none', '--tome_r=2')
    return out


def test_tome_trains_and_evaluates_the_plain_tower(tome_run):
    """tome_r > 0: the plain tower merges tokens in training and zero-shot evaluation (16 patches,
    2 blocks, 2 merged in each: 12 patch tokens left, compression 16 / 12); the checkpoint holds the
    plain ViT's weights."""
    out = tome_run
    logged = records(out)
    assert [r['compression'] for r in logged if 'loss' in r] == pytest.approx([16 / 12] * 2)
    assert [r for r in logged if 'zeroshot_top1' in r][-1]['eval_compression'] == pytest.approx(16 / 12)
    keys = load_ckpt(out)['model']
    assert 'visual.proj' in keys and not any('predictor' in k for k in keys)


def test_resuming_a_tome_run_without_its_tome_settings_is_refused(tome_run):
    """The checkpoint holds the plain ViT's weights, so a resume that forgot --tome_r would silently go
    on training another model; it stops and names the setting (evaluation may change it: see below)."""
    proc = run(TINY, f'--out_dir={tome_run}', '--init_from=resume', '--max_steps=4', '--boundary=none', check=False)
    assert proc.returncode != 0 and 'tome_r=0 (checkpoint: 2)' in proc.stderr and 'Traceback' not in proc.stderr
    assert load_ckpt(tome_run)['step'] == 2


TINY_PLAIN = DTPConfig(image_size=32, patch_size=8, width=32, heads=2, embed_dim=32, pre_layers=1, short_layers=1,
                       boundary='none')  # the tower of config/shapes_tiny.py with --boundary=none, by hand


def applied_schedule(r, n_tokens=17, depth=2):
    """What each block of the tiny plain tower merges with ToMe's r: at most (L - 1) // 2 of its L tokens."""
    rs, merged = [r] * depth if isinstance(r, int) else r, []
    for r_block in rs:
        merged.append(min(r_block, (n_tokens - 1) // 2))
        n_tokens -= merged[-1]
    return merged


def cheapest_tome_cost():
    """fvcore's count of the tiny plain tower with ToMe halving the tokens in every block, over the plain tower's."""
    import flops
    import tome
    from model import DTPViT
    images = torch.zeros(1, 3, 32, 32)
    return (flops.fvcore_count(tome.patch(DTPViT(TINY_PLAIN), 1000), images).total()
            / flops.fvcore_count(DTPViT(TINY_PLAIN), images).total())


@pytest.mark.parametrize('args, expected, absent', [
    (['--boundary=gumbel', '--tome_r=2'], ["set boundary='none'", "boundary='gumbel'"],
     ["(got 'none')", 'tome_cost <']),
    (['--boundary=none', '--tome_r=2', '--tome_cost=0.5'], ['tome_r=2 and tome_cost=0.5', 'set one of them'],
     ["(got 'none')", 'boundary']),
    (['--boundary=none', '--tome_cost=1.5'], ['tome_cost=1.5', 'tome_cost <= 1'], ["(got 'none')", 'boundary']),
    (['--boundary=none', '--tome_cost=0.01'], ['ToMe cost 0.01', None], ["(got 'none')"]),
], ids=['dtp_tower', 'tome_r_and_tome_cost', 'cost_above_1', 'cost_below_the_cheapest'])
def test_tome_settings_that_cannot_apply_are_one_line_errors(tmp_path, args, expected, absent):
    """Each problem on its own line, saying what to change (the one message for all of them used to tell a plain
    run "needs boundary='none' (got 'none')"); a cost below the cheapest schedule (every block halving its
    tokens) names that cheapest cost, instead of silently training the cheapest schedule."""
    expected = [f'{cheapest_tome_cost():.3f}' if e is None else e for e in expected]
    proc = run(TINY, f'--out_dir={tmp_path / "run"}', '--max_steps=1', *args, check=False)
    errors = [line for line in proc.stderr.splitlines() if 'config error' in line]
    assert proc.returncode != 0 and len(errors) == 1 and errors[0].startswith('config error: '), proc.stderr[-2000:]
    assert all(e in errors[0] for e in expected) and not any(a in errors[0] for a in absent), errors[0]
    assert 'Traceback' not in proc.stderr and not os.path.exists(tmp_path / 'run' / 'ckpt.pt')


def test_tome_cost_picks_the_schedule_of_that_cost(tmp_path):
    """tome_cost = c: ToMe merges by flops.tome_r_for_cost's per-block schedule for c, in training and
    evaluation (what a row 'ToMe at DTP's cost' needs), and prints the schedule that runs."""
    import flops
    rs = flops.tome_r_for_cost(TINY_PLAIN, 0.75, per_block=True)
    merged = applied_schedule(rs)
    left = 16 - sum(merged)  # patch tokens left ([CLS] never merges)
    assert 0 < left < 16  # the schedule merges something
    out = str(tmp_path / 'run')
    proc = run(TINY, f'--out_dir={out}', '--max_steps=2', '--log_interval=1', '--boundary=none', '--tome_cost=0.75')
    assert f'ToMe: {flops.format_r(merged)} tokens merged per block' in proc.stdout
    logged = records(out)
    assert [r['compression'] for r in logged if 'loss' in r] == pytest.approx([16 / left] * 2, rel=1e-6)
    assert [r for r in logged if 'zeroshot_top1' in r][-1]['eval_compression'] == 16 / left


def test_tome_prints_the_schedule_that_runs_not_the_one_asked_for(tmp_path):
    """tome_r=1000 saturates: 1 + 16 tokens, the first block merges (17 - 1) // 2 = 8, leaving 9, the second
    (9 - 1) // 2 = 4, leaving 4 patch tokens. The run says so (it used to print 'r = 1000 per block')."""
    import flops
    assert applied_schedule(1000) == [8, 4]
    out = str(tmp_path / 'run')
    proc = run(TINY, f'--out_dir={out}', '--boundary=none', '--tome_r=1000', '--max_steps=1')
    assert flops.format_r([8, 4]) == 'r=[8]*1+[4]*1'
    # the log lines' measured speeds may read 1000 (samples_per_s 1000 failed it once): only they are left out
    printed = re.sub(r'\b(step_time|data_time|samples_per_s|avg_step_time) \S+', '', proc.stdout)
    assert 'ToMe: r=[8]*1+[4]*1 tokens merged per block' in printed and '1000' not in printed
    assert [r for r in records(out) if 'zeroshot_top1' in r][-1]['eval_compression'] == 16 / 4


@pytest.mark.parametrize('setting', ['--boundary=fixed', '--boundary=cosine', '--tome_cost=0.75'])
def test_a_plain_run_shortened_training_free(tmp_path, plain_checkpoint, setting):
    """A plain-ViT run's checkpoint (conftest's plain_checkpoint) evaluated with pooling it was never trained with
    (fixed, the cosine router, ToMe): eval_only with init_from=ckpt.pt and the new setting runs at the pooled
    length."""
    import flops
    again = str(tmp_path / 'again')
    extra = ['--boundary=none'] if 'tome' in setting else ['--compression=4']
    run(TINY, f'--out_dir={again}', f'--init_from={plain_checkpoint}', '--eval_only=True', setting, *extra)
    final = [r for r in records(again) if 'zeroshot_top1' in r][-1]
    assert not [r for r in records(again) if 'loss' in r]
    if 'tome' in setting:  # 16 patches less what the schedule of that cost merges
        left = 16 - sum(applied_schedule(flops.tome_r_for_cost(TINY_PLAIN, 0.75, per_block=True)))
        assert final['eval_compression'] == 16 / left
    else:  # round(16 / 4) = 4 segments of every image
        assert final['eval_compression'] == 16 / 4


def test_a_job_wide_sigterm_with_loader_workers_still_saves_the_last_step(tmp_path):
    """Streaming shards through two loader workers, the signal reaching every process of the job."""
    check_job_wide_sigterm_with_workers('train_clip.py', TINY, tmp_path, f"--train_data={data.make_shapes()['shards']}",
                                        runner=run_preloaded)


# From a pretrained CLIP to a faster one (docs/pretrained.md) -----------------------------------------

@pytest.mark.parametrize('boundary, router', [('fixed', {}), ('gumbel', {}), ('router', {'min_segment': 1}),
                                              ('cosine', {'size_attention': True})])
def test_pooling_with_one_segment_per_patch_computes_the_plain_checkpoints_output(plain_checkpoint, boundary, router):
    """Inserting pooling into a pretrained plain tower changes nothing until segments hold more than one patch:
    every patch its own segment (size 1: no size bias either), the plain model's embedding."""
    args = dict(torch.load(plain_checkpoint, weights_only=True)['model_args'], pretrained=plain_checkpoint)
    plain = load_openclip(**args).visual.eval()
    pooled = load_openclip(**dict(args, boundary=boundary, compression=1.0, **router),
                           tower=tower_class(boundary)).visual.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = plain(images)
        features, aux = pooled(images)
    assert aux['n_segments'].tolist() == [16] * 4
    assert (features - expected).abs().max() <= 1e-5 and expected.abs().max() > 0.1


@pytest.mark.parametrize('pooling', [['--boundary=none'], ['--boundary=fixed', '--compression=4']])
def test_a_finetune_starts_from_the_checkpoint_and_evaluates_it_first(plain_checkpoint, tmp_path, pooling):
    """A finetune's zero-shot at step 0 is the training-free model's: the checkpoint's own final evaluation for
    the plain tower, eval_only's with the pooling inserted."""
    trained_run = os.path.dirname(plain_checkpoint)
    checkpoint_eval = [r for r in records(trained_run) if 'zeroshot_top1' in r][-1]
    run(TINY, f'--init_from={plain_checkpoint}', *pooling, '--max_steps=4', '--eval_interval=2',
        f'--out_dir={tmp_path / "ft"}')
    evals = [r for r in records(tmp_path / 'ft') if 'zeroshot_top1' in r]
    assert [r['step'] for r in evals] == [0, 2, 4]
    if pooling == ['--boundary=none']:
        assert {**evals[0], 'step': 20} == checkpoint_eval
    else:
        run(TINY, f'--init_from={plain_checkpoint}', *pooling, '--eval_only=True', f'--out_dir={tmp_path / "eval"}')
        assert evals[0] == records(tmp_path / 'eval')[-1]
        assert evals[0]['eval_compression'] == 4.0 and checkpoint_eval['eval_compression'] == 1.0
    start, end = torch.load(plain_checkpoint, weights_only=True)['model'], load_ckpt(tmp_path / 'ft')['model']
    assert not torch.equal(start['visual.proj'], end['visual.proj'])  # and then it trains
