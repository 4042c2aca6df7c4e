# The demo with dynamic token pooling in Hilbert order: every segment is a connected 2D region.
#   python train_clip.py config/shapes_dtp4x_hilbert.py
out_dir = 'out/clip-shapes-dtp4x-hilbert'
boundary = 'gumbel'
compression = 4.0
scan = 'hilbert'
