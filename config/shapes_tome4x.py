# The demo's plain ViT trained with ToMe merging, at the cost of 4x pooling (0.518 of the plain ViT's
# MMACs: r = [6, 6, 6, 5, 5, 5] tokens merged per block).
#   python train_clip.py config/shapes_tome4x.py
out_dir = 'out/clip-shapes-tome4x'
boundary = 'none'
tome_cost = 0.518
