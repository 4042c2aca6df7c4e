"""Helpers shared by the test files."""
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_shard(path):
    """{key: {ext: bytes}} straight from a tar, without webdataset."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split('.', 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def write_tar(path, samples):
    """A webdataset shard of [(key, {ext: bytes})]."""
    with tarfile.open(path, 'w') as tar:
        for key, files in samples:
            for ext, blob in files.items():
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']  # two ranks


def run_script(script, *args, torchrun=False, check=True, timeout=600):
    """Run a training script with args in a subprocess from the repository root, as one process or as two
    torchrun ranks. With check, a failed run raises, showing the end of its output."""
    launcher = TORCHRUN if torchrun else [sys.executable]
    proc = subprocess.run(launcher + [script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f'{script} {args} failed (exit status {proc.returncode}; < 0: killed by that signal):\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def terminate_mid_run(script, out_dir, *args, after_step=3, job_wide=False, torchrun=False):
    """Start a training script (one process, or two torchrun ranks) that would run for long, send it SIGTERM
    once its log shows step after_step, as a scheduler preempting the job (or torchrun passing the signal on)
    would, and return the finished process (returncode, stdout and stderr read). job_wide: the signal goes to
    every process of the job (its process group: the data loader's workers too), as Slurm sends it; otherwise
    to the process started (torchrun passes it on to its ranks)."""
    launcher = TORCHRUN if torchrun else [sys.executable]
    proc = subprocess.Popen([*launcher, script, *args, f'--out_dir={out_dir}', '--log_interval=1'], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=job_wide)

    def reached():
        try:
            return any(r.get('step', 0) >= after_step and 'loss' in r for r in records(out_dir))
        except (OSError, ValueError):  # no log yet, or a line caught half-written
            return False
    deadline = time.time() + 300
    while not reached():
        assert proc.poll() is None and time.time() < deadline, f'{script} ended or stalled before step {after_step}'
        time.sleep(0.05)
    if job_wide:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
    return proc


def check_job_wide_sigterm_with_workers(script, config, tmp_path, *args):
    """SIGTERM to every process of the job, data loader workers (workers=2) included: the workers
    outlive it, so the run still finishes its step, saves it and exits; the children are gone (nothing
    hangs at exit) and the run resumes from that step."""
    out = str(tmp_path / 'run')
    proc = terminate_mid_run(script, out, config, '--workers=2', '--max_steps=100000', '--ckpt_interval=1000', *args,
                             job_wide=True)
    assert proc.returncode != 0 and 'stopped by SIGTERM after step' in proc.stderr_text, proc.stderr_text[-2000:]
    assert 'Traceback' not in proc.stderr_text
    step = load_ckpt(out)['step']
    assert step >= 3 and step == train_records(out)[-1]['step']
    assert records(out)[-1] == dict(step=step, stopped_by='SIGTERM')
    with pytest.raises(ProcessLookupError):  # the group is empty: no worker left behind
        os.killpg(proc.pid, 0)
    run_script(script, config, f'--out_dir={out}', '--workers=2', f'--max_steps={step + 2}', '--init_from=resume',
               *args)
    assert train_records(out)[-1]['step'] == step + 2


def records(out_dir):
    """The lines of a run's log.jsonl."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_records(out_dir):
    """The log lines of training steps (those with a loss)."""
    return [r for r in records(out_dir) if 'loss' in r]


def load_ckpt(out_dir):
    """A run's ckpt.pt."""
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def check_sigterm_loses_nothing(script, config, tmp_path):
    """A scheduler's SIGTERM mid-run (preemption, a time limit): the run finishes its step, saves it and
    exits with a message; resumed, it ends with the weights of a run that was never stopped."""
    stopped, straight = str(tmp_path / 'stopped'), str(tmp_path / 'straight')
    proc = terminate_mid_run(script, stopped, config, '--max_steps=100000', '--lr_decay_steps=60',
                             '--ckpt_interval=1000')
    assert proc.returncode != 0 and 'stopped by SIGTERM after step' in proc.stderr_text
    assert 'Traceback' not in proc.stderr_text
    step = load_ckpt(stopped)['step']
    assert step >= 3 and step == train_records(stopped)[-1]['step']  # the last step it trained, not the last save
    assert records(stopped)[-1] == dict(step=step, stopped_by='SIGTERM')
    run_script(script, config, f'--out_dir={straight}', f'--max_steps={step + 3}', '--lr_decay_steps=60')
    run_script(script, config, f'--out_dir={stopped}', f'--max_steps={step + 3}', '--lr_decay_steps=60',
               '--init_from=resume')
    a, b = (load_ckpt(d)['model'] for d in (straight, stopped))
    assert all(torch.equal(a[k], b[k]) for k in a)


def check_reinforce_run(script, config, tmp_path, steps, router=None):
    """A short boundary='router' run (routers.py's learned router, trained by REINFORCE against the image's own
    best cuts), with these router settings (None: RouterConfig's defaults): exactly the target compression (k
    cuts per image) on every log line, a finite REINFORCE term, a predictor that moved from where it started
    (its last layer starts at zero, and REINFORCE is its only gradient), and evaluation cuts of the trained
    model that keep every segment at least min_segment patches long."""
    import routers
    from model import load_openclip
    out = str(tmp_path / 'run')
    run_script(script, config, f'--out_dir={out}', f'--max_steps={steps}', '--log_interval=2', '--boundary=router',
               *([f'--router={router!r}'] if router else []))
    lines = train_records(out)
    assert len(lines) == steps // 2 and all(r['compression'] == 4.0 and math.isfinite(r['reinforce']) for r in lines)
    ckpt = load_ckpt(out)
    weights = ckpt['model']
    assert weights['visual.predictor.3.weight'].any()  # zero at the start: REINFORCE moved it
    assert weights['visual.predictor.color_gain'].item() != 4.0  # RouterConfig.color_prior, where it started
    visual = load_openclip(**ckpt['model_args'], tower=routers.RouterViT).visual
    visual.load_state_dict({k[len('visual.'):]: v for k, v in weights.items() if k.startswith('visual.')})
    assert visual.cfg.min_segment == (router or {}).get('min_segment', 2)
    torch.manual_seed(0)
    with torch.no_grad():
        aux = visual.eval()(torch.randn(8, 3, 32, 32))[1]
    assert aux['n_segments'].eq(4).all() and aux['segment_sizes'].min() >= visual.cfg.min_segment  # 16 patches


def check_distortion_weight(script, config, tmp_path):
    """The router's distortion_weight: the same REINFORCE run (same seed, same draws) with the pooling distortion in
    the samples' cost (3, the default) trains its router differently from one without (0), and logs the
    distortion, a share in (0, 1)."""
    outs = [str(tmp_path / f'weight{w}') for w in (0, 3)]
    for out, weight in zip(outs, (0.0, 3.0)):
        run_script(script, config, f'--out_dir={out}', '--max_steps=4', '--log_interval=2', '--boundary=router',
                   f"--router={{'distortion_weight': {weight}}}")
    assert all(0 < r['distortion'] < 1 for out in outs for r in train_records(out))
    without, with_ = (load_ckpt(out)['model'] for out in outs)
    assert not torch.equal(without['visual.predictor.3.weight'], with_['visual.predictor.3.weight'])


@pytest.fixture(scope='session')
def plain_checkpoint(tmp_path_factory):
    """A plain CLIP checkpoint of this project (train_clip.py with boundary='none', tiny, 20 steps): the
    pretrained model of docs/pretrained.md's path, at test size. Returns its path."""
    out = str(tmp_path_factory.mktemp('plain') / 'run')
    run_script('train_clip.py', 'config/shapes_tiny.py', '--boundary=none', f'--out_dir={out}', '--max_steps=20')
    return os.path.join(out, 'ckpt.pt')
