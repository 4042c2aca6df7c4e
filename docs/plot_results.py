"""
The accuracy-against-cost picture of the demo: zero-shot top-1 on the shapes val set against the
image tower's MMACs per image, for the plain ViT, fixed pooling, learned DTP, the routers and ToMe, trained at
each cost, and pooled training-free from the one plain-ViT checkpoint.

    python docs/plot_results.py --commands          # the train_clip.py commands of every point
    python docs/plot_results.py --runs out          # reads out/<run>/log.jsonl, writes docs/accuracy_vs_mmacs.png

Each point is the mean over the seeds found (runs named <name>-s<seed>, see RUNS below), with a bar
from the lowest to the highest seed; points whose runs are missing are left out. The MMACs are
flops.py's counts for the demo's tower (48 px, 6 x 6 patches, width 128, 2 + 4 blocks), not
numbers typed in. The commands behind every run name are in README.md, section Results.
Drawn with Pillow (which torchvision already installs), so it adds no dependency.
"""
import argparse
import dataclasses
import glob
import json
import os
import statistics
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import flops  # noqa: E402
from model import DTPConfig  # noqa: E402

DEMO = DTPConfig(image_size=48, patch_size=8, width=128, heads=4, embed_dim=128, pre_layers=2, short_layers=4,
                 boundary='none')


def mmacs(kind, ratio=None, cost=None, **settings):
    """MMACs per image of the demo tower: 'none', 'fixed', 'cosine', 'color' or 'gumbel' at a ratio (and other
    DTPConfig settings, e.g. predictor_pairs=True), or 'tome' at a cost."""
    if kind == 'tome':
        return flops.tome_gmacs(DEMO, flops.tome_r_for_cost(DEMO, cost, per_block=True)) * 1e3
    if kind == 'none':
        return flops.gmacs(DEMO) * 1e3
    return flops.gmacs(dataclasses.replace(DEMO, boundary=kind, compression=ratio, **settings)) * 1e3


# series -> points: (MMACs, run name, the train_clip.py arguments that make it). Trained points are
# runs <name>-s0, -s1, ... (the arguments + --seed=S --out_dir=out/<name>-sS); training-free points
# evaluate the plain run vit-s0 once (--out_dir=out/<name>). `--commands` prints them all.
TF = '--init_from=out/vit-s0/ckpt.pt --eval_only=True config/shapes_vit.py'
TOME_COSTS = {2: 0.676, 4: 0.518, 10: 0.431}  # DTP's fixed-pooling cost at 2x, 4x, 10x on the demo tower
RUNS = {
    'plain ViT': [(mmacs('none'), 'vit', 'config/shapes_vit.py')],
    'fixed pooling': [(mmacs('fixed', r), f'fixed{r}x-raster' if r != 4 else 'fixed-raster',
                       f'config/shapes_fixed4x.py --compression={r}') for r in (2, 4, 10)],
    'learned DTP (Gumbel)': [(mmacs('gumbel', r), f'dtp{r}x-raster' if r != 4 else 'dtp-raster',
                              f'config/shapes_dtp4x.py --compression={r}') for r in (2, 4, 10)],
    'cosine router': [(mmacs('cosine', r), f'cosinesize{r}x-raster' if r != 4 else 'cosinesize-raster',
                       f'config/shapes_cosine4x.py --compression={r}') for r in (2, 4, 10)],
    'colour router': [(mmacs('color', r), f'color{r}x-raster' if r != 4 else 'color-raster',
                       f'config/shapes_color4x.py --compression={r}') for r in (4, 10)],
    'REINFORCE router': [(mmacs('gumbel', r), f'rl-ext{r}x-raster' if r != 4 else 'rl-ext-raster',
                          f'config/shapes_reinforce4x.py --compression={r}') for r in (4, 10)],
    'REINFORCE, self-critical, noise 2': [
        (mmacs('gumbel', r), f'scrl2-ext{r}x-raster' if r != 4 else 'scrl2-ext-raster',
         f'config/shapes_reinforce4x.py --reinforce_baseline=greedy --boundary_noise=2 --compression={r}')
        for r in (4, 10)],
    'learned, from colour cuts': [
        (mmacs('gumbel', r), f'colorprior{r}x-raster' if r != 4 else 'colorprior-raster',
         f'config/shapes_colorprior10x.py --compression={r}') for r in (4, 10)],
    'learned, pairs + colour cuts': [
        (mmacs('gumbel', r, predictor_pairs=True), f'pairscolor{r}x-raster',
         f'config/shapes_pairscolor10x.py --compression={r}') for r in (4, 10)],
    'the demo\'s router (segments >= 2 patches)': [
        (mmacs('gumbel', 4, predictor_pairs=True), 'router4x-raster', 'config/shapes_router4x.py')],
    'ToMe': [(mmacs('tome', cost=c), f'tome{r}x', f'config/shapes_tome4x.py --tome_cost={c}')
             for r, c in TOME_COSTS.items()],
    'fixed, training-free': [(mmacs('fixed', r), f'tf-fixed{r}x', f'{TF} --boundary=fixed --compression={r}')
                             for r in (2, 4, 10)],
    'cosine router, training-free': [(mmacs('cosine', r), f'tf-cosine{r}x-size',
                                      f'{TF} --boundary=cosine --size_attention=True --compression={r}')
                                     for r in (2, 4, 10)],
    'ToMe, training-free': [(mmacs('tome', cost=c), f'tf-tome{r}x', f'{TF} --tome_cost={c}')
                            for r, c in TOME_COSTS.items()],
}
# Seeds behind each trained point in the README's tables (others: seed 0 only).
SEEDS = {'vit': 3, 'fixed-raster': 5, 'dtp-raster': 3, 'cosinesize-raster': 3, 'tome4x': 3, 'fixed10x-raster': 5,
         'cosinesize10x-raster': 5, 'color-raster': 3, 'color10x-raster': 5, 'rl-ext-raster': 2,
         'rl-ext10x-raster': 5, 'scrl2-ext-raster': 5, 'scrl2-ext10x-raster': 5,
         'colorprior-raster': 5, 'colorprior10x-raster': 5, 'pairscolor4x-raster': 3, 'pairscolor10x-raster': 5,
         'router4x-raster': 5}
COLOURS = {'plain ViT': '#000000', 'fixed pooling': '#1f77b4', 'learned DTP (Gumbel)': '#d62728', 'ToMe': '#2ca02c',
           'cosine router': '#9467bd', 'colour router': '#ff7f0e', 'REINFORCE router': '#8c564b',
           'REINFORCE, self-critical, noise 2': '#e377c2', 'learned, from colour cuts': '#bcbd22',
           'learned, pairs + colour cuts': '#17becf', 'the demo\'s router (segments >= 2 patches)': '#ff00ff',
           'fixed, training-free': '#1f77b4', 'cosine router, training-free': '#9467bd', 'ToMe, training-free': '#2ca02c'}


def final_top1(run_dir):
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        evals = [r for r in map(json.loads, f) if 'zeroshot_top1' in r]
    return evals[-1]['zeroshot_top1'] if evals else None


def collect(runs_dir):
    """{series: [(mmacs, mean, lo, hi, n)]} for the points whose runs exist."""
    out = {}
    for series, points in RUNS.items():
        for x, prefix, _ in points:
            dirs = sorted(glob.glob(os.path.join(runs_dir, f'{prefix}-s[0-9]*'))) or \
                sorted(glob.glob(os.path.join(runs_dir, prefix)))
            accs = [a for a in map(final_top1, dirs) if a is not None]
            if accs:
                out.setdefault(series, []).append((x, statistics.fmean(accs), min(accs), max(accs), len(accs)))
    return out


def draw(results, path, size=(1040, 600)):
    W, H = size
    left, right, top, bottom = 70, 370, 40, 60
    xs = [p[0] for pts in results.values() for p in pts]
    ys = [v for pts in results.values() for p in pts for v in p[1:4]]
    x0, x1 = 5 * int(min(xs) // 5), 5 * int(max(xs) // 5 + 1)
    y0, y1 = 10 * int(min(ys) // 10), min(100, 10 * int(max(ys) // 10 + 1))
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    d.font = ImageFont.load_default(size=13)

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    d.rectangle([px(x0, y1), px(x1, y0)], outline='black')
    for x in range(x0, x1 + 1, 5):
        d.line([px(x, y0), px(x, y1)], fill='#e6e6e6')
        d.text((px(x, y0)[0] - 6, H - bottom + 6), str(x), fill='black')
    for y in range(y0, y1 + 1, 10):
        d.line([px(x0, y), px(x1, y)], fill='#e6e6e6')
        d.text((left - 28, px(x0, y)[1] - 6), f'{y}%', fill='black')
    d.text((left + 180, H - 28), 'image tower MMACs per image (flops.py)', fill='black')
    d.text((left, 12), 'shapes demo: zero-shot top-1 against cost (mean of seeds, bar: lowest to highest)', fill='black')
    for i, (series, pts) in enumerate(results.items()):
        colour, hollow = COLOURS.get(series, '#7f7f7f'), 'training-free' in series
        pts = sorted(pts)
        if len(pts) > 1:
            line = [px(x, m) for x, m, *_ in pts]
            if hollow:  # dashed
                for a, b in zip(line, line[1:]):
                    for t in range(0, 10, 2):
                        d.line([tuple(a[k] + (b[k] - a[k]) * t / 10 for k in range(2)),
                                tuple(a[k] + (b[k] - a[k]) * (t + 1) / 10 for k in range(2))], fill=colour, width=2)
            else:
                d.line(line, fill=colour, width=2)
        for x, m, lo, hi, n in pts:
            cx, cy = px(x, m)
            d.line([px(x, lo), px(x, hi)], fill=colour, width=1)
            d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], outline=colour, fill='white' if hollow else colour, width=2)
        ly = top + 10 + 22 * i
        d.ellipse([W - right + 20, ly, W - right + 30, ly + 10], outline=colour, fill='white' if hollow else colour,
                  width=2)
        seeds = '/'.join(sorted({str(p[4]) for p in pts}))
        d.text((W - right + 38, ly - 1), f'{series} ({seeds} run{"s" if seeds != "1" else ""} per point)',
               fill='black')
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', default='out', help='folder of the run directories')
    p.add_argument('--commands', action='store_true', help='print the command of every run and exit')
    p.add_argument('--png', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'accuracy_vs_mmacs.png'))
    args = p.parse_args()
    if args.commands:
        for series, points in RUNS.items():
            for _, name, cmd in points:
                if series.endswith('training-free'):
                    print(f'python train_clip.py {cmd} --out_dir={args.runs}/{name}')
                else:
                    seeds = ' '.join(map(str, range(SEEDS.get(name, 1))))
                    print(f'for S in {seeds}; do python train_clip.py {cmd} --seed=$S --out_dir={args.runs}/{name}-s$S; done')
        return
    results = collect(args.runs)
    if not results:
        raise SystemExit(f'no finished runs under {args.runs} (names in RUNS, e.g. {args.runs}/fixed-raster-s0)')
    for series, pts in results.items():
        for x, m, lo, hi, n in sorted(pts):
            print(f'{series:30s} {x:6.2f} MMACs  top-1 {m:5.1f}% (range {lo:.1f}-{hi:.1f}, {n} runs)')
    draw(results, args.png)
    print(f'wrote {args.png}')


if __name__ == '__main__':
    main()
