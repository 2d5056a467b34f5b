"""Why batching gives the server less than 4x at concurrency 4: greedy answers to 4 (or 8) LaMP-4 dev prompts,
one at a time vs one batch, base model vs peft mixed-adapter batches (4 adapters), 2 threads. Prints
(seconds, new tokens) per line; two repetitions, the second after warm-up.

    python bench/generation_batching.py   # reads ../shared/data/lamp-offline
"""
import time

import torch

torch.set_num_threads(2)
from prisp.console import quiet_transformers; quiet_transformers()
from prisp.models import load_model
from prisp.data.lamp import load_task_split
from prisp.data.prompts import query_prompt
from prisp.generation import generate, GenerationConfig
from prisp.adapters import attach_lora, random_init, LoraSpec, shared_copy
import warnings; warnings.simplefilter("ignore")
l = load_model("smollm2-135m"); m, tok = l.model, l.tokenizer
split = load_task_split("/work/shared/data/lamp-offline", "LaMP-4", "dev")
prompts = [query_prompt("LaMP-4", q.input) for q in split.queries[:8]]
cfg = GenerationConfig(max_new_tokens=32, batch_size=8)
peft = attach_lora(shared_copy(m), random_init(m, LoraSpec(), seed=0)).eval()
for i in range(1, 4):
    peft.add_adapter(f"a{i}", LoraSpec().to_peft_config())
names = ["default", "a1", "a2", "a3"]
def t(f):
    s=time.perf_counter(); r=f(); return round(time.perf_counter()-s,2), r
for rep in range(2):
    print("base 1x4", t(lambda: [generate(m, tok, [p], cfg).new_tokens for p in prompts[:4]]))
    print("base b4", t(lambda: generate(m, tok, prompts[:4], cfg).new_tokens))
    print("peft single adapter b4", t(lambda: generate(peft, tok, prompts[:4], cfg).new_tokens))
    print("peft mixed b4", t(lambda: generate(peft, tok, prompts[:4], cfg, adapter_names=names).new_tokens))
    print("peft mixed b8", t(lambda: generate(peft, tok, prompts[:8], cfg, adapter_names=names*2).new_tokens))
