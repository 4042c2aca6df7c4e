"""Helpers shared by the test files."""
import contextlib
import io
import json
import math
import os
import select
import signal
import subprocess
import sys
import tarfile
import tempfile
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


# What a fresh interpreter spends ~5 s on before a tiny run starts: the libraries. Not the project's own modules
# (0.1 s): each run imports them anew, so it runs the source as it is now, not as it was when the server started.
PRELOADED = ('torch', 'torchvision', 'open_clip', 'webdataset', 'tqdm', 'PIL.JpegImagePlugin')

# The server behind run_preloaded, run as `python -c`: it imports PRELOADED once, then for each request (a line of
# JSON on stdin) forks a child that runs the script and answers with the child's pid and then its exit status. A
# fork copies only the thread that called it, so the server must have no other: it runs with OMP_NUM_THREADS=1
# (importing torch otherwise starts OpenMP's pool, whose threads a child would lack) and forks only while it is
# single-threaded. The child then takes the environment and the number of threads a fresh interpreter would have.
_FORK_SERVER = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
for name in sys.argv[1].split(','):
    __import__(name)
import atexit, runpy, threading
replies = sys.stdout
for line in sys.stdin.buffer:
    request = json.loads(line)
    if len(os.listdir('/proc/self/task')) != 1:  # a thread started by an import: forking is not safe
        replies.write(json.dumps(dict(pid=None)) + '\n')
        replies.flush()
        continue
    replies.flush()
    pid = os.fork()
    if pid == 0:  # the child: the script's process, ending as the interpreter ends one
        code = 1
        try:
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], os.O_WRONLY),
                                    (2, request['stderr'], os.O_WRONLY)):
                opened = os.open(path, flags)
                os.dup2(opened, fd)
                os.close(opened)
            os.environ.pop('OMP_NUM_THREADS')  # the server's: a fresh interpreter has pytest's, if any
            if request['omp'] is not None:
                os.environ['OMP_NUM_THREADS'] = request['omp']
            sys.modules['torch'].set_num_threads(request['threads'])  # and its threads (OpenMP's, MKL's)
            sys.argv = [request['script'], *request['args']]
            sys.path[0] = os.path.dirname(os.path.abspath(request['script']))
            if 'numpy' in sys.modules:  # its global generator, seeded anew as in a fresh interpreter (Python's
                sys.modules['numpy'].random.seed()  # random reseeds itself after a fork; str hashes cannot)
            try:
                runpy.run_path(request['script'], run_name='__main__')
                code = 0
            except SystemExit as e:  # as the interpreter: None is 0, a number the status, anything else printed
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                sys.excepthook(*sys.exc_info())
            threading._shutdown()  # the interpreter's exit: wait for threads, then the exit handlers
            atexit._run_exitfuncs()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code & 0xFF)
    replies.write(json.dumps(dict(pid=pid)) + '\n')
    replies.flush()
    replies.write(json.dumps(dict(returncode=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))) + '\n')
    replies.flush()
"""
_fork_server = {}  # the running server, with the process and environment it belongs to
FRESH_THREADS = torch.get_num_threads()  # what a fresh interpreter starts with here (pytest's, before any test)


def _server():
    """The fork server of this process and environment (a process forked from pytest, or one whose environment changed
    since, gets one of its own; pytest's own PYTEST_CURRENT_TEST aside), started on first use; it ends when pytest
    exits, its stdin closing."""
    key = (os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k != 'PYTEST_CURRENT_TEST')))
    if _fork_server.get('key') != key or _fork_server['proc'].poll() is not None:
        log = tempfile.TemporaryFile()  # the server's own stderr: an import that failed, shown if it stops
        proc = subprocess.Popen([sys.executable, '-c', _FORK_SERVER, ','.join(PRELOADED)], cwd=ROOT,
                                env=dict(os.environ, OMP_NUM_THREADS='1'), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, bufsize=0)
        _fork_server.update(key=key, proc=proc, log=log)
    return _fork_server['proc']


def run_preloaded(script, *args, check=True, timeout=600):
    """run_script for one process, without the ~5 s a fresh interpreter spends importing torch, torchvision,
    open_clip and torch.compile's machinery (most of a tiny run's time): the script runs in a process forked from a
    server that has imported the libraries (PRELOADED) and nothing else. The child is a process of its own, run from the
    repository root: it runs the script as __main__ with these arguments, with stdout and stderr of its own, and ends
    as the interpreter ends one (a SystemExit message printed on stderr with status 1, an uncaught exception's
    traceback with status 1, the exit handlers run), so it returns what run_script returns. What needs the real
    launcher (torchrun, a signal sent to the process started) uses run_script and terminate_mid_run."""
    server = _server()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, name) for name in ('stdout', 'stderr')]
        for path in paths:
            open(path, 'w').close()
        pid = None
        try:
            with contextlib.suppress(BrokenPipeError):  # a server that stopped answers nothing: said below
                server.stdin.write((json.dumps(dict(script=script, args=list(args), stdout=paths[0], stderr=paths[1],
                                                    omp=os.environ.get('OMP_NUM_THREADS'), threads=FRESH_THREADS))
                                    + '\n').encode())
            reply = server.stdout.readline()
            if not reply:  # e.g. an import of PRELOADED failed: its traceback
                _fork_server['log'].seek(0)
                raise RuntimeError(f'the fork server stopped:\n{_fork_server["log"].read().decode()[-3000:]}')
            pid = json.loads(reply)['pid']
            if pid is None:  # it could not fork safely: a fresh interpreter, then
                return run_script(script, *args, check=check, timeout=timeout)
            finished = select.select([server.stdout], [], [], timeout)[0]
            if not finished:
                with contextlib.suppress(ProcessLookupError):  # as subprocess.run's timeout
                    os.kill(pid, signal.SIGKILL)
            returncode = json.loads(server.stdout.readline())['returncode']
        except BaseException:  # interrupted between a request and its answer: the next call starts a new server
            server.kill()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise
        stdout, stderr = (open(path).read() for path in paths)
    if not finished:
        raise subprocess.TimeoutExpired([script, *args], timeout, stdout, stderr)
    if check and returncode:
        raise AssertionError(f'{script} {args} failed (exit status {returncode}; < 0: killed by that signal):\n'
                             f'{stdout[-3000:]}\n{stderr[-3000:]}')
    return subprocess.CompletedProcess([script, *args], returncode, stdout, stderr)


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


def check_job_wide_sigterm_with_workers(script, config, tmp_path, *args, runner=run_script):
    """SIGTERM to every process of the job, data loader workers (workers=2) included: the workers
    outlive it, so the run still finishes its step, saves it and exits; the children are gone (nothing
    hangs at exit) and the run resumes from that step. runner: what runs the resumed run (run_script, or
    run_preloaded); the signalled run is always a fresh interpreter."""
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
    runner(script, config, f'--out_dir={out}', '--workers=2', f'--max_steps={step + 2}', '--init_from=resume', *args)
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


def check_sigterm_loses_nothing(script, config, tmp_path, runner=run_script):
    """A scheduler's SIGTERM mid-run (preemption, a time limit): the run finishes its step, saves it and
    exits with a message; resumed, it ends with the weights of a run that was never stopped. runner: what runs
    the straight and the resumed run (run_script, or run_preloaded); the signalled run is always a fresh
    interpreter."""
    stopped, straight = str(tmp_path / 'stopped'), str(tmp_path / 'straight')
    proc = terminate_mid_run(script, stopped, config, '--max_steps=100000', '--lr_decay_steps=60',
                             '--ckpt_interval=1000')
    assert proc.returncode != 0 and 'stopped by SIGTERM after step' in proc.stderr_text
    assert 'Traceback' not in proc.stderr_text
    step = load_ckpt(stopped)['step']
    assert step >= 3 and step == train_records(stopped)[-1]['step']  # the last step it trained, not the last save
    assert records(stopped)[-1] == dict(step=step, stopped_by='SIGTERM')
    runner(script, config, f'--out_dir={straight}', f'--max_steps={step + 3}', '--lr_decay_steps=60')
    runner(script, config, f'--out_dir={stopped}', f'--max_steps={step + 3}', '--lr_decay_steps=60',
           '--init_from=resume')
    a, b = (load_ckpt(d)['model'] for d in (straight, stopped))
    assert all(torch.equal(a[k], b[k]) for k in a)


def check_reinforce_run(script, config, tmp_path, steps, router=None, runner=run_script):
    """A short boundary='router' run (routers.py's learned router, trained by REINFORCE against the image's own
    best cuts), with these router settings (None: RouterConfig's defaults): exactly the target compression (k
    cuts per image) on every log line, a finite REINFORCE term, a predictor that moved from where it started
    (its last layer starts at zero, and REINFORCE is its only gradient), and evaluation cuts of the trained
    model that keep every segment at least min_segment patches long. runner: run_script, or run_preloaded."""
    import routers
    from model import load_openclip
    out = str(tmp_path / 'run')
    runner(script, config, f'--out_dir={out}', f'--max_steps={steps}', '--log_interval=2', '--boundary=router',
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


def check_distortion_weight(script, config, tmp_path, runner=run_script):
    """The router's distortion_weight: the same REINFORCE run (same seed, same draws) with the pooling distortion in
    the samples' cost (3, the default) trains its router differently from one without (0), and logs the
    distortion, a share in (0, 1). runner: run_script, or run_preloaded."""
    outs = [str(tmp_path / f'weight{w}') for w in (0, 3)]
    for out, weight in zip(outs, (0.0, 3.0)):
        runner(script, config, f'--out_dir={out}', '--max_steps=4', '--log_interval=2', '--boundary=router',
               f"--router={{'distortion_weight': {weight}}}")
    assert all(0 < r['distortion'] < 1 for out in outs for r in train_records(out))
    without, with_ = (load_ckpt(out)['model'] for out in outs)
    assert not torch.equal(without['visual.predictor.3.weight'], with_['visual.predictor.3.weight'])


@pytest.fixture(scope='session')
def plain_checkpoint(tmp_path_factory):
    """A plain CLIP checkpoint of this project (train_clip.py with boundary='none', tiny, 20 steps): the
    pretrained model of docs/pretrained.md's path, at test size. Returns its path."""
    out = str(tmp_path_factory.mktemp('plain') / 'run')
    run_preloaded('train_clip.py', 'config/shapes_tiny.py', '--boundary=none', f'--out_dir={out}', '--max_steps=20')
    return os.path.join(out, 'ckpt.pt')
