# The demo with the paper's dynamic token pooling at 4 patches per segment (the script's defaults, spelled out).
#   python train_clip.py config/shapes_dtp4x.py
out_dir = 'out/clip-shapes-dtp4x'
boundary = 'gumbel'
compression = 4.0
