# The CPU demo (README, Quick start): the learned router at 4 patches per segment in raster order (README,
# "Where learned pooling stands"): the router of config/shapes_pairscolor10x.py (a Gumbel predictor that reads
# each patch with its change to the next, starts at the colour rule's cuts and learns by REINFORCE against the
# image's own top-k cuts, paid for its pooling distortion), with the layers after pooling trained on the cuts
# evaluation takes (train_on_greedy) and segments of at least 2 patches (min_segment), in its samples and in
# evaluation.
#   python train_clip.py config/shapes_router4x.py
out_dir = 'out/clip-shapes-router4x'
boundary = 'gumbel'
compression = 4.0
train_boundaries = 'reinforce'
reinforce_baseline = 'greedy'
train_on_greedy = True
min_segment = 2
boundary_noise = 2.0
color_prior = 4.0
router_lr_scale = 10.0
extent_embedding = True
predictor_pairs = True
distortion_weight = 3.0
