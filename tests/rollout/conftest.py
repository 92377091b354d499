import torch

# Several test processes share two cores; intra-op threads would only contend.
torch.set_num_threads(1)
