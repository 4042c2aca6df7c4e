"""
From a pretrained CLIP to a faster one: the table and figure of docs/pretrained.md, from the runs' logs.

Every run lies in out/pretrained/<stage>-<method><R>x-s<seed> (docs/pretrained.sh makes them), with stage
'ft' (train_clip.py config/shapes_finetune.py: its zero-shot at step 0 is the training-free accuracy, stage a;
its last one, after the short finetune, stage c) or 'probe' (train_cls.py config/shapes_cls_probe.py on the frozen
tower: its last val top-1, stage b). The MMACs per image are flops.py's count of the tower the run's
checkpoint holds (ToMe: of the schedule its tome_cost picks).

docs/pretrained.csv is the record of every run: a run found under out/pretrained replaces its row (same stage,
method, ratio and seed) and the other rows stay, so part of the table can be run again on its own.

    python docs/pretrained.py                      # docs/pretrained.csv and the markdown table on stdout
    python docs/pretrained.py --plot               # also docs/pretrained.png (needs matplotlib:
                                                   #   pip install -r docs/requirements.txt)
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
METHODS = {'vit': 'plain ViT', 'fixed': 'fixed pooling', 'dtp': "paper's predictor", 'router': 'router',
           'cosine': 'cosine rule + size attention', 'tome': 'ToMe'}
STAGES = {'a': 'training-free', 'b': 'frozen tower + probe', 'c': 'short finetune'}


def macs_of(run):
    """MMACs per image of the image tower a run trained or evaluated (flops.py's closed form)."""
    sys.path.insert(0, ROOT)
    import torch
    import flops
    from model import load_openclip
    from train_utils import tower_class
    ckpt = torch.load(os.path.join(run, 'ckpt.pt'), map_location='cpu', weights_only=True)
    config, args = ckpt['config'], ckpt['model_args']
    cfg = load_openclip(**args, tower=tower_class(args.get('boundary'))).visual.cfg
    if config.get('tome_cost'):
        return 1e3 * flops.tome_gmacs(cfg, flops.tome_r_for_cost(cfg, config['tome_cost'], per_block=True))
    return 1e3 * flops.gmacs(flops.plain_config(cfg) if cfg.boundary == 'none' else cfg)


def collect(run_dir):
    """One row per (stage, method, ratio, seed) from the runs under run_dir."""
    rows = []
    for log in sorted(glob.glob(os.path.join(run_dir, '*-s*', 'log.jsonl'))):
        run = os.path.dirname(log)
        match = re.fullmatch(r'(ft|probe)-([a-z]+)(\d+)x-s(\d+)', os.path.basename(run))
        if not match or not os.path.exists(os.path.join(run, 'ckpt.pt')):
            continue  # not a run of this table, or one that has not finished
        kind, name, ratio, seed = match.groups()
        records = list(map(json.loads, open(log)))
        key = 'zeroshot_top1' if kind == 'ft' else 'val_top1'
        evals = [r for r in records if key in r]
        row = dict(method=METHODS[name], ratio=int(ratio), seed=int(seed), mmacs=round(macs_of(run), 2))
        if kind == 'ft':
            start = [r for r in evals if r['step'] == 0]
            rows.append(dict(row, stage='a', top1=round(start[0][key], 2)))
            rows.append(dict(row, stage='c', top1=round(evals[-1][key], 2)))
        else:
            rows.append(dict(row, stage='b', top1=round(evals[-1][key], 2)))
    return rows


def safe_insertion(run_dir, checkpoint):
    """Markdown: the training-free evaluations of what makes pooling safe to insert (tf-<rule>[sa]<R>x[-pre<P>])."""
    sys.path.insert(0, ROOT)
    import torch
    import flops
    from model import load_openclip
    from train_utils import tower_class
    args = torch.load(checkpoint, map_location='cpu', weights_only=True)['model_args']
    rows = []
    for log in sorted(glob.glob(os.path.join(run_dir, 'tf-*', 'log.jsonl'))):
        match = re.fullmatch(r'tf-(fixed|cosine)(sa)?(\d+)x(?:-pre(\d))?', os.path.basename(os.path.dirname(log)))
        evals = [r for r in map(json.loads, open(log)) if 'zeroshot_top1' in r]
        if not match or not evals:
            continue
        rule, sa, ratio, pre = match.groups()
        pre = int(pre or 2)
        cfg = load_openclip(**dict(args, boundary=rule, compression=float(ratio), pre_layers=pre,
                                   short_layers=args['pre_layers'] + args['short_layers'] - pre),
                            tower=tower_class(rule)).visual.cfg
        rows.append(((rule, bool(sa), int(ratio), pre), f"| {rule} | {'yes' if sa else 'no'} | {pre} | {ratio}x | "
                     f"{1e3 * flops.gmacs(cfg):.2f} | {evals[-1]['zeroshot_top1']:.1f} | "
                     f"{evals[-1]['segment_purity']:.2f} |"))
    header = ['| rule | size-aware attention | pooled after block | ratio | MMACs | zero-shot top-1 | segment_purity |',
              '|---' * 7 + '|']
    return '\n'.join(header + [line for _, line in sorted(rows)])


def table(rows):
    """Markdown: a row per method and ratio, a column per stage: mean over seeds (min-max, runs), and the MMACs."""
    cells = {}
    for r in rows:
        cells.setdefault((r['method'], r['ratio']), {}).setdefault(r['stage'], []).append(r)
    lines = ['| pooling | ratio | MMACs | ' + ' | '.join(STAGES.values()) + ' |', '|---' * 6 + '|']
    order = list(METHODS.values())
    for (method, ratio), stages in sorted(cells.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        out = []
        for stage in STAGES:
            values = [r['top1'] for r in stages.get(stage, [])]
            if not values:
                out.append('')
            elif len(set(values)) == 1:  # deterministic (training-free) or one run
                out.append(f'{values[0]:.1f}' + (f' ({len(values)} runs, equal)' if len(values) > 1 else ''))
            else:
                out.append(f'{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f}, {len(values)} runs)')
        mmacs = next(iter(stages.values()))[0]['mmacs']
        lines.append(f"| {method} | {ratio}x | {mmacs:.2f} | " + ' | '.join(out) + ' |')
    return '\n'.join(lines)


def plot(rows, path):
    """Accuracy kept (relative to the plain model at that stage) against MMACs: a line per method, a marker
    style per stage."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    mean = {}
    for r in rows:
        mean.setdefault((r['method'], r['stage'], r['mmacs']), []).append(r['top1'])
    mean = {k: statistics.mean(v) for k, v in mean.items()}
    plain = {stage: v for (method, stage, _), v in mean.items() if method == METHODS['vit']}
    colours = dict(zip(METHODS.values(), ['black', 'tab:blue', 'tab:orange', 'tab:green', 'tab:olive', 'tab:purple']))
    markers, dashes = dict(a='o', b='s', c='^'), dict(a=':', b='--', c='-')
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method in METHODS.values():
        for stage in STAGES:
            points = sorted((macs, 100 * v / plain[stage]) for (m, s, macs), v in mean.items()
                            if m == method and s == stage and stage in plain)
            if points:
                ax.plot(*zip(*points), dashes[stage], marker=markers[stage], color=colours[method])
    ax.set_xlabel('image tower MMACs per image')
    ax.set_ylabel("top-1, % of the plain model's at the same stage")
    ax.set_title('A plain CLIP checkpoint made cheaper (built-in shapes; mean of 3 seeds where trained)', fontsize=10)
    ax.grid(alpha=0.3)
    methods = ax.legend([Line2D([], [], color=c) for c in colours.values()], list(colours), fontsize=7,
                        loc='lower right', title='method', title_fontsize=7)
    ax.add_artist(methods)
    ax.legend([Line2D([], [], linestyle=dashes[s], marker=markers[s], color='grey') for s in STAGES],
              list(STAGES.values()), fontsize=7, loc='lower center', title='stage', title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', default=os.path.join(ROOT, 'out', 'pretrained'))
    parser.add_argument('--plot', action='store_true')
    args = parser.parse_args()
    path = os.path.join(ROOT, 'docs', 'pretrained.csv')
    key = lambda r: (r['stage'], r['method'], r['ratio'], r['seed'])
    rows = {}
    if os.path.exists(path):
        for r in csv.DictReader(open(path)):
            r.update(ratio=int(r['ratio']), seed=int(r['seed']), top1=float(r['top1']), mmacs=float(r['mmacs']))
            rows[key(r)] = r
    rows.update({key(r): r for r in collect(args.runs)})  # a run that is here replaces its recorded row
    rows = list(rows.values())
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, ['stage', 'method', 'ratio', 'seed', 'top1', 'mmacs'])
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r['stage'], r['method'], r['ratio'], r['seed'])))
    print(table(rows))
    print()
    print(safe_insertion(args.runs, os.path.join(ROOT, 'out', 'clip-shapes-vit', 'ckpt.pt')))
    if args.plot:
        plot(rows, os.path.join(ROOT, 'docs', 'pretrained.png'))
