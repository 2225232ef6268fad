# Run with: torchrun --nproc_per_node=4 train_2d.py   (2 data-parallel x 2 context-parallel)
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

from longattn.integrations import transformers as cp

mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))  # starts gloo too
torch.manual_seed(0)  # the same weights everywhere
config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     attn_implementation=cp.register())
model = fully_shard(LlamaForCausalLM(config), mesh=mesh)  # replicated over dp, sharded over cp
torch.manual_seed(1 + mesh["dp"].get_local_rank())  # each replica its own documents
docs = [{"input_ids": torch.randint(0, 1000, (n,)).tolist()} for n in (100, 37, 119)]
batch = cp.shard_inputs(**DataCollatorWithFlattening()(docs), group=mesh["cp"],
                        dp_group=mesh["dp"])  # tokens counted over both replicas
loss = model(**batch).loss  # the mean token loss of the global batch (both replicas)
loss.backward()  # FSDP2 averages over all 4 ranks: exactly that loss's gradient
torch.optim.AdamW(model.parameters(), lr=1e-3).step()
print(f"rank {mesh.get_rank()}: loss {loss.item():.6f}")
