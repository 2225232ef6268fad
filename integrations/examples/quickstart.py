# Run with: torchrun --nproc_per_node=4 quickstart.py   (4 CPU ranks, gloo)
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

from longattn.integrations import transformers as cp

dist.init_process_group("gloo")
world = dist.group.WORLD  # the context-parallel group: here all 4 ranks
torch.manual_seed(0)  # the same weights and documents on every rank
config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     attn_implementation=cp.register())  # register() returns "longattn_cp"
model = DistributedDataParallel(LlamaForCausalLM(config), process_group=world)
docs = [{"input_ids": torch.randint(0, 1000, (n,)).tolist()} for n in (100, 37, 119)]
packed = DataCollatorWithFlattening()(docs)  # one row of 256 tokens, positions restart
batch = cp.shard_inputs(**packed, group=world)  # 64 tokens per rank
loss = model(**batch).loss  # the whole batch's mean token loss, on every rank
loss.backward()  # DDP averages the ranks' gradients: exactly the whole batch's gradient
print(f"rank {dist.get_rank()}: loss {loss.item():.6f}")
