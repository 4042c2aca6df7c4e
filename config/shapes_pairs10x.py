# The demo with a learned router that sees where the features change, at 10 patches per segment: the Gumbel
# predictor reads each patch with its change to the next (predictor_pairs) and learns by REINFORCE against
# the image's own top-k cuts (self-critical), with twice the noise, at 10x the lr; each sample's cost is its
# pair's contrastive loss plus 3x its pooling distortion (the share of the patches' variance that the
# segment means lose). It starts as fixed pooling (position prior); extent embeddings on the pooled tokens.
# 4x pooling:
#   python train_clip.py config/shapes_pairs10x.py --compression=4
out_dir = 'out/clip-shapes-pairs10x'
boundary = 'gumbel'
compression = 10.0
train_boundaries = 'reinforce'
reinforce_baseline = 'greedy'
boundary_noise = 2.0
position_prior = 2.0
router_lr_scale = 10.0
extent_embedding = True
predictor_pairs = True
distortion_weight = 3.0
