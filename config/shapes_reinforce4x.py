# The demo with the REINFORCE router at 4 patches per segment: the Gumbel predictor, trained by REINFORCE
# on each pair's contrastive loss instead of the paper's straight-through gradient, starting exactly as
# fixed pooling (position prior), at 10x the lr; extent embeddings on the pooled tokens. 10x pooling:
#   python train_clip.py config/shapes_reinforce4x.py --compression=10
out_dir = 'out/clip-shapes-reinforce4x'
boundary = 'gumbel'
compression = 4.0
train_boundaries = 'reinforce'
position_prior = 2.0
router_lr_scale = 10.0
extent_embedding = True
