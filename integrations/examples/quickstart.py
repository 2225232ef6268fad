# Run with: torchrun --nproc_per_node=4 quickstart.py   (4 CPU ranks, gloo)
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from longattn.integrations import transformers as cp

dist.init_process_group("gloo")
world = dist.group.WORLD  # the context-parallel group: here all 4 ranks
torch.manual_seed(0)  # the same weights on every rank
config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     attn_implementation=cp.register())  # register() returns "longattn_cp"
model = LlamaForCausalLM(config)
input_ids = torch.randint(0, 1000, (1, 256))  # the whole batch, the same on every rank
batch = cp.shard_inputs(input_ids, labels=input_ids, group=world,
                        layout=cp.layout_for(config))  # 64 tokens per rank
loss = model(**batch).loss  # every attention layer spans all 256 tokens
loss.backward()
cp.all_reduce_grads(model, world)  # the full-sequence gradient on every rank
print(f"rank {dist.get_rank()}: loss {cp.reduce_loss(loss, world).item():.6f}")
