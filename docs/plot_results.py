"""
The README's accuracy-against-cost figure: zero-shot top-1 on the shapes val set against the image tower's
MMACs per image, one line per method (4x and 10x pooling), the mean over seeds with a bar from the lowest to
the highest seed. Its data are docs/results.csv: one row per run (method, ratio, seed, top-1, MMACs, where it
was recorded, the command that reproduces it).

    pip install -r docs/requirements.txt                  # matplotlib, for this script only
    python docs/plot_results.py                           # docs/results.csv -> docs/accuracy_vs_mmacs.png
    python docs/plot_results.py --collect out/rerun       # first update the CSV from runs' logs

--collect reads every <dir>/<name>-s<seed>/log.jsonl (the last zero-shot record) and ckpt.pt (the command's
settings and the tower, whose MMACs flops.py counts), and replaces the CSV rows of the same method, ratio and
seed; the run's name says the method (vit, fixed, dtp, router, tome).
"""
import argparse
import csv
import glob
import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV = os.path.join(ROOT, 'docs', 'results.csv')
METHODS = {'vit': 'plain ViT', 'fixed': 'fixed pooling', 'dtp': "paper's predictor", 'router': 'routers.py router',
           'tome': 'ToMe'}
STYLE = {'plain ViT': ('black', 'o'), 'fixed pooling': ('tab:blue', 's'), "paper's predictor": ('tab:orange', 'v'),
         'routers.py router': ('tab:green', 'D'), 'ToMe': ('tab:purple', '^')}


def collect(run_dir, rows):
    """rows updated from the runs under run_dir (see the docstring)."""
    sys.path.insert(0, ROOT)
    import torch
    import flops
    from model import load_openclip
    from train_utils import tower_class
    commit = os.popen(f'git -C {ROOT} rev-parse --short HEAD').read().strip()
    for log in sorted(glob.glob(os.path.join(run_dir, '*-s*', 'log.jsonl'))):
        run = os.path.dirname(log)
        name, seed = re.fullmatch(r'([a-z]+)\d*x?-s(\d+)', os.path.basename(run)).groups()
        evals = [r for r in map(json.loads, open(log)) if 'zeroshot_top1' in r]
        if name not in METHODS or not evals:
            continue
        ckpt = torch.load(os.path.join(run, 'ckpt.pt'), map_location='cpu', weights_only=True)
        config, args = ckpt['config'], ckpt['model_args']
        cfg = load_openclip(**args, tower=tower_class(args.get('boundary'))).visual.cfg
        if config.get('tome_cost'):
            macs = flops.tome_gmacs(cfg, flops.tome_r_for_cost(cfg, config['tome_cost'], per_block=True))
        else:
            macs = flops.gmacs(flops.plain_config(cfg) if cfg.boundary == 'none' else cfg)
        ratio = 1 if name == 'vit' else round(cfg.compression)
        # the command of the same method and ratio in the CSV (a run's checkpoint stores settings, not its command)
        command = next((r['command'] for r in rows if r['method'] == METHODS[name] and int(r['ratio']) == ratio), '')
        new = dict(method=METHODS[name], ratio=ratio, seed=int(seed), top1=round(evals[-1]['zeroshot_top1'], 2),
                   mmacs=round(macs * 1e3, 2), source=f'run at {commit}', command=command)
        rows = [r for r in rows if (r['method'], int(r['ratio']), int(r['seed'])) != (new['method'], ratio, new['seed'])]
        rows.append(new)
        print(f"{os.path.basename(run)}: {new['method']} {ratio}x seed {seed}: {new['top1']}%, {new['mmacs']} MMACs")
    order = list(METHODS.values())
    return sorted(rows, key=lambda r: (order.index(r['method']), int(r['ratio']), int(r['seed'])))


def summary(rows):
    """{method: [(MMACs, mean, lowest, highest, seeds, ratio)]} over the rows' seeds."""
    points = {}
    for method in METHODS.values():
        for ratio in sorted({int(r['ratio']) for r in rows if r['method'] == method}, reverse=True):
            runs = [r for r in rows if r['method'] == method and int(r['ratio']) == ratio]
            top1 = [float(r['top1']) for r in runs]
            points.setdefault(method, []).append((float(runs[0]['mmacs']), statistics.fmean(top1), min(top1),
                                                  max(top1), len(top1), ratio))
    return points


def plot(points, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=150)
    for method, pts in points.items():
        color, marker = STYLE[method]
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, capsize=3, linewidth=1.5,
                    label=f"{method} ({', '.join(str(p[4]) for p in pts)} seeds)")
        for p in pts:
            if p[5] != 1:
                ax.annotate(f'{p[5]}x', (p[0], p[1]), textcoords='offset points', xytext=(6, -10), fontsize=7,
                            color=color)
    demo = next(p for p in points['routers.py router'] if p[5] == 4)
    ax.annotate('the demo: config/shapes_router4x.py', (demo[0], demo[1]), textcoords='offset points',
                xytext=(12, 2), fontsize=7, color=STYLE['routers.py router'][0])
    ax.set_xlabel('image tower MMACs per image (flops.py)')
    ax.set_ylabel('zero-shot top-1 on shapes val (%)')
    ax.set_title('Shapes demo, 1248 steps: mean over seeds, bars from lowest to highest seed', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    fig.savefig(path)
    print(f'wrote {path}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--collect', metavar='DIR', help='update docs/results.csv from the runs under DIR first')
    parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'accuracy_vs_mmacs.png'))
    args = parser.parse_args(argv)
    rows = list(csv.DictReader(open(CSV)))
    if args.collect:
        rows = collect(args.collect, rows)
        with open(CSV, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=['method', 'ratio', 'seed', 'top1', 'mmacs', 'source', 'command'])
            writer.writeheader()
            writer.writerows(rows)
    points = summary(rows)
    for method, pts in points.items():
        print(f"{method:20s} " + '; '.join(f'{p[5]}x {p[1]:.1f}% ({p[4]} seeds, {p[2]:.1f}-{p[3]:.1f}), '
                                           f'{p[0]:.2f} MMACs' for p in pts))
    plot(points, args.out)


if __name__ == '__main__':
    main()
