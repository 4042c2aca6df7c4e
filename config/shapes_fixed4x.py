# The demo with fixed pooling: evenly spaced segments of 4 patches (9 segments of the 36 patches).
#   python train_clip.py config/shapes_fixed4x.py
out_dir = 'out/clip-shapes-fixed4x'
boundary = 'fixed'
