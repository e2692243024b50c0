"""Check the transformers integration on a CUDA device (random-weight BERT, no download).

Prints, for a randomly initialized BertModel on the GPU in bf16: the cosine of
the pooled outputs between SDPA and HyperAttention with one block holding
every key (must be ≈ 1: the integration, masks and layouts are right), and
with b = m = 64 (an approximation), plus a backward pass through the Triton
kernels.
"""

import datetime

import torch
import transformers
import triton
from transformers import BertConfig, BertModel

import hyperref.gpu.hf_attention as hf
from hyperref import HyperConfig

torch.manual_seed(0)
cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                 max_position_embeddings=1024, attention_probs_dropout_prob=0.0)
ids = torch.randint(0, cfg.vocab_size, (2, 1000), device="cuda")
mask = torch.ones_like(ids)
mask[1, 900:] = 0  # padding in the second sequence


def pooled(impl):
    torch.manual_seed(0)
    cfg._attn_implementation = impl
    model = BertModel(cfg).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    m = mask[..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"triton {triton.__version__}, {datetime.date.today().isoformat()}")
ref = pooled("sdpa")
hf.register(HyperConfig(block=1024, samples=16, min_seq_len=64), name="hyper_all")
print("one block holds every key, cosine:", (pooled("hyper_all") * ref).sum(-1).tolist())
hf.register(HyperConfig(block=64, samples=64, min_seq_len=64), name="hyper_64")
print("b = m = 64, cosine:", (pooled("hyper_64") * ref).sum(-1).tolist())
cfg._attn_implementation = "hyper_64"
model = BertModel(cfg).cuda().to(torch.bfloat16).train()
out = model(input_ids=ids[:1], attention_mask=mask[:1]).last_hidden_state
out.float().square().mean().backward()
g = model.encoder.layer[0].attention.self.query.weight.grad
print("backward through the Triton kernels: finite", bool(torch.isfinite(g).all()), "norm", float(g.float().norm()))
