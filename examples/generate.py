"""Generate with a 512-slot evicting KV cache and print what the cache physically holds.

python examples/generate.py
"""

import torch

import kvpass

model, tok = kvpass.load_default_model()
small = kvpass.transform(model, policy="tova", budget=512)  # 512 KV slots per layer and KV head
chat = [{"role": "user", "content": "Write a short story about a librarian who forgets nothing."}]
ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = small.generate(**ids, max_new_tokens=600, do_sample=True, temperature=0.7, top_p=0.9)
print(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
print(kvpass.cache_stats(small))  # the cache never held more than 512 tokens per layer and KV head
