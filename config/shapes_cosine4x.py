# The demo with the cosine router at 4 patches per segment: no router weights, segments closed where
# neighbouring patch features change most, pooled tokens weighted by their size in attention.
#   python train_clip.py config/shapes_cosine4x.py
out_dir = 'out/clip-shapes-cosine4x'
boundary = 'cosine'
compression = 4.0
size_attention = True
