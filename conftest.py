"""Helpers shared by the test files."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

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


def run_script(script, *args, torchrun=False, check=True, timeout=600):
    """Run a training script with args in a subprocess from the repository root, as one process or as two
    torchrun ranks. With check, a failed run raises, showing the end of its output."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if torchrun \
        else [sys.executable]
    proc = subprocess.run(launcher + [script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f'{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def terminate_mid_run(script, out_dir, *args, after_step=3):
    """Start a training script (one process) that would run for long, send it SIGTERM once its log shows
    step after_step, as a scheduler preempting the job (or torchrun passing the signal on) would, and
    return the finished process (returncode, stdout and stderr read)."""
    proc = subprocess.Popen([sys.executable, script, *args, f'--out_dir={out_dir}', '--log_interval=1'], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def reached():
        try:
            return any(r.get('step', 0) >= after_step and 'loss' in r for r in records(out_dir))
        except (OSError, ValueError):  # no log yet, or a line caught half-written
            return False
    deadline = time.time() + 300
    while not reached():
        assert proc.poll() is None and time.time() < deadline, f'{script} ended or stalled before step {after_step}'
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
    return proc


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
