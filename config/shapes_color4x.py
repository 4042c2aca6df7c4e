# The demo with routers.py's colour rule at 4 patches per segment: no weights, segments closed where the mean
# colour of neighbouring patches changes most (the same segments for an image through the whole run).
#   python train_clip.py config/shapes_color4x.py
out_dir = 'out/clip-shapes-color4x'
boundary = 'color'
