# A seconds-long run for tests and smoke checks: a tiny model, a few steps, no worker processes.
#   python train_clip.py config/shapes_tiny.py
out_dir = 'out/clip-shapes-tiny'
vision = dict(image_size=32, patch_size=8, width=32, heads=2, embed_dim=32, predictor_hidden=32)
text = dict(width=32, heads=2, layers=1, context_length=24)
pre_layers = 1
short_layers = 1
batch_size = 32
max_steps = 20
warmup_steps = 5
log_interval = 5
ckpt_interval = 10
workers = 0
train_num_samples = 1024  # the first 1024 shapes images: decoded in ~1 s instead of ~8 s for all 10,000
