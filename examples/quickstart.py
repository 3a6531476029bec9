"""Quickstart: N:M sparse softmax attention on a HuggingFace causal LM (CPU, tiny model).

Run: python examples/quickstart.py

A real checkpoint works the same way: replace the tiny random model with
``AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")``.
On CUDA the preset runs the fused Triton kernel; on CPU ("auto" backend) it runs the
PyTorch reference, which computes the same thing.
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import modelopt_sparse as mts


def tiny_llama(seed: int = 0):
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def main():
    model = tiny_llama()
    prompt = torch.randint(0, 128, (2, 160), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        dense_logits = model(**inputs).logits

    # 1. Convert every attention module: prefill keeps 2 of every 4 scores per query.
    mts.sparsify(model, mts.SPARSE_SOFTMAX_DEFAULT)
    mts.print_summary(model)

    with torch.no_grad():
        sparse_logits = model(**inputs).logits
        # Prefill runs sparse; every single-token decode step is dense.
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print("max |sparse - dense| logits:", (sparse_logits - dense_logits).abs().max().item())
    print("generated:", tokens[:, prompt.shape[1]:].tolist())

    # 2. Switch sparsity off and on again (disabled modules run dense through the same kernel).
    mts.disable(model)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, dense_logits, atol=1e-5)
    mts.enable(model)

    with tempfile.TemporaryDirectory() as tmp:
        # 3. modelopt_sparse checkpoint: JSON conversion state + safetensors weights.
        mts.save(model, f"{tmp}/ckpt")
        fresh = mts.restore(tiny_llama(seed=123), f"{tmp}/ckpt")
        with torch.no_grad():
            assert torch.equal(fresh(**inputs).logits, sparse_logits)

        # 4. HuggingFace checkpoint: the sparse config travels in config.json.
        model.save_pretrained(f"{tmp}/hf")
        loaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/hf").eval()
        mts.restore_from_pretrained(loaded)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, sparse_logits)
    print("OK")


if __name__ == "__main__":
    main()
