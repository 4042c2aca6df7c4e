# The demo with fixed pooling in Hilbert order: runs of 4 consecutive patches along a Hilbert curve,
# mostly 2x2 blocks (9 segments of the 36 patches).
#   python train_clip.py config/shapes_fixed4x_hilbert.py
out_dir = 'out/clip-shapes-fixed4x-hilbert'
boundary = 'fixed'
compression = 4.0
scan = 'hilbert'
