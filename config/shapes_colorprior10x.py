# The demo with a learned router that starts at the colour rule's cuts, at 10 patches per segment: the
# Gumbel predictor's logits get the colour change between neighbouring patches times a learned gain, and
# it learns by REINFORCE against the image's own top-k cuts (self-critical), with twice the noise, at 10x
# the lr; extent embeddings on the pooled tokens. 4x pooling:
#   python train_clip.py config/shapes_colorprior10x.py --compression=4
out_dir = 'out/clip-shapes-colorprior10x'
boundary = 'gumbel'
compression = 10.0
train_boundaries = 'reinforce'
reinforce_baseline = 'greedy'
boundary_noise = 2.0
color_prior = 4.0
router_lr_scale = 10.0
extent_embedding = True
