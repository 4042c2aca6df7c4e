# From a pretrained CLIP to a faster one, stage (c): a short CLIP finetune of the whole model (both towers)
# from a plain CLIP checkpoint with pooling inserted after its second block, on the data it was trained on.
# The checkpoint is the plain demo run's (python train_clip.py config/shapes_vit.py); 125 steps, a tenth of
# its 1248. The zero-shot evaluation at step 0 is the pooling's training-free accuracy (stage a).
#   python train_clip.py config/shapes_finetune.py --boundary=fixed --compression=4 --out_dir=out/ft-fixed4x
#   python train_clip.py config/shapes_finetune.py --boundary=none --tome_cost=0.518 --out_dir=out/ft-tome4x
# docs/pretrained.md runs it for every pooling, 2x/4x/10x and 3 seeds (docs/pretrained.sh).
exec(open('config/shapes_vit.py').read())
out_dir = 'out/ft-fixed4x'
init_from = 'out/clip-shapes-vit/ckpt.pt'
boundary = 'fixed'
compression = 4.0
max_steps = 125
warmup_steps = 25
lr = 1e-3                   # half the pretraining peak. A screen (fixed 4x, seed 0, on an earlier plain checkpoint
                            # of 91.7%): 87.5% against 84.3% at 5e-4 and 75.5% at 1e-4
eval_interval = 125         # the zero-shot at step 0 (training-free) and at the end
