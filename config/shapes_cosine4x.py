# The demo with routers.py's cosine rule at 4 patches per segment: no weights, segments closed where
# neighbouring patch features change most, pooled tokens weighted by their size in attention.
#   python train_clip.py config/shapes_cosine4x.py
out_dir = 'out/clip-shapes-cosine4x'
boundary = 'cosine'
router = dict(size_attention=True)
